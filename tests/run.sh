#!/usr/bin/env bash
# The test command. On a fresh machine with Python 3.11 it creates .venv, installs the package with every
# extra the suite uses, and runs the whole suite (slow tests included).
#   bash tests/run.sh            # everything (CI)
#   bash tests/run.sh --quick    # skip tests marked slow (inner loop, <= 10 minutes)
#   bash tests/run.sh -m parity  # any pytest arguments pass through; they compose with --quick
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh "test,data,beam,tpu,torch"
exec python -m pytest tests "$@"
