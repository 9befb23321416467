#!/usr/bin/env bash
# Placeholder until the trainer lands: sets up the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh ""
echo "varedit_jax installed in $VAREDIT_ROOT/.venv"
