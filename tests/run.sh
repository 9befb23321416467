#!/usr/bin/env bash
# The test command. On a fresh machine with Python 3.11 it creates .venv, installs the package with every
# extra the suite uses (and Debian's chromium + chromium-driver for the demo's browser tests, when missing), and runs
# the whole suite (slow tests included).
#   bash tests/run.sh            # everything (CI)
#   bash tests/run.sh --quick    # skip tests marked slow (inner loop, <= 10 minutes)
#   bash tests/run.sh -m parity  # any pytest arguments pass through; they compose with --quick
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh "test,data,beam,tpu,torch,demo"

# Browser tests (tests/test_demo.py) drive Debian's chromium through its chromedriver; browser downloads at run time
# fail here. Installed only when missing, non-interactively; a failed install is reported and those tests skip.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[run] installing chromium + chromium-driver with apt-get"
    _apt=(env DEBIAN_FRONTEND=noninteractive apt-get -qq -o DPkg::Lock::Timeout=300)
    if ! { "${_apt[@]}" update && "${_apt[@]}" install -y --no-install-recommends chromium chromium-driver; } \
        >/tmp/varedit_apt.log 2>&1; then
      echo "[run] warning: apt-get could not install chromium (log: /tmp/varedit_apt.log); browser tests will skip"
    fi
  else
    echo "[run] warning: chromium / chromedriver missing and apt-get unavailable (not root?); browser tests will skip"
  fi
fi
exec python -m pytest tests --durations=30 "$@"
