# Sourced by launch/*.sh and tests/run.sh: create or reuse .venv and install the package with extras.
#   source launch/env.sh "test,data,beam,tpu,torch"
# Re-installs only when setup.py or the extras changed (stamp file in .venv).
set -euo pipefail
_extras="${1:-}"
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_venv="${VAREDIT_VENV:-$_root/.venv}"
_python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x "$_venv/bin/python" ]; then
  echo "[env] creating $_venv with $_python"
  "$_python" -m venv "$_venv"
fi
if ! "$_venv/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "error: $_venv has Python $("$_venv/bin/python" -c 'import platform; print(platform.python_version())'); jax" \
       "needs >= 3.11: remove it and set PYTHON=/path/to/python3.11 (TPU workers: launch/worker.sh setup uses uv)" >&2
  exit 1
fi
_stamp="$_venv/.varedit_stamp"
_want="$(cat "$_root/setup.py" | sha1sum | cut -d' ' -f1) [$_extras]"
if [ ! -f "$_stamp" ] || ! grep -qxF "$_want" "$_stamp"; then
  echo "[env] installing varedit_jax[$_extras] into $_venv"
  _pip=("$_venv/bin/python" -m pip install -q --disable-pip-version-check)
  if [[ ",$_extras," == *",torch,"* ]]; then
    # The CPU wheel; a bare `torch` would pull several GB of CUDA packages.
    "${_pip[@]}" "torch==2.13.0"
  fi
  "${_pip[@]}" -e "$_root${_extras:+[$_extras]}"
  # Append, so that installing a smaller set of extras later does not trigger a reinstall.
  echo "$_want" >> "$_stamp"
fi
export PATH="$_venv/bin:$PATH"
export VAREDIT_ROOT="$_root"
