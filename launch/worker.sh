#!/usr/bin/env bash
# What runs on one TPU worker (a TPU VM host or an xpk pod), from the shipped tree; launch/common.sh calls it.
#
#   bash launch/worker.sh setup          # Python 3.11 venv (.venv) with the tpu and data extras
#   bash launch/worker.sh start CMD...   # setup, then CMD detached (survives the ssh session), log in logs/
#   bash launch/worker.sh run CMD...     # CMD in the venv in the foreground (xpk pods; what `start` detaches)
#   bash launch/worker.sh stop           # SIGTERM to the run (it saves a checkpoint and exits), waits for it
#   bash launch/worker.sh logs           # follows this worker's log, lines prefixed with the host name
#
# Stock TPU VM images and xpk's default image ship Python 3.10; jax needs >= 3.11: setup installs `uv` from PyPI
# (pip --user) when it is missing and lets it make a 3.11 venv (uv downloads that Python when the host has none),
# then installs this tree into it (launch/env.sh: only when setup.py or the extras changed).
# One log per worker: logs/worker-<host name>.log (appended; each start writes a header). logs/run.pid: the run.
set -euo pipefail
cd "$(dirname "$0")/.."
LOG="logs/worker-$HOSTNAME.log"
PIDFILE="logs/run.pid"
STOP_WAIT_S="${VAREDIT_STOP_WAIT_S:-900}"  # how long `stop` waits for the checkpoint save

running_pid() {  # the pid of this worker's run, if it is alive
  local pid
  pid="$(cat "$PIDFILE" 2>/dev/null || true)"
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then echo "$pid"; fi
}

setup() {
  export PATH="$HOME/.local/bin:$PATH"
  if ! command -v uv >/dev/null; then
    echo "[worker] installing uv (pip --user)"
    python3 -m pip install -q --user uv || python3 -m pip install -q --user --break-system-packages uv
  fi
  if [ -x .venv/bin/python ] && ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "[worker] replacing .venv (Python < 3.11)"
    rm -rf .venv
  fi
  if [ ! -x .venv/bin/python ]; then
    uv venv --seed --python 3.11 .venv
  fi
  source launch/env.sh "tpu,data"
}

case "${1:-}" in
  setup)
    setup ;;
  run)
    shift
    source launch/env.sh "tpu,data" >/dev/null
    mkdir -p logs
    echo $$ > "$PIDFILE"
    exec "$@" ;;
  start)
    shift
    pid="$(running_pid)"
    if [ -n "$pid" ]; then
      echo "error: $HOSTNAME: a run is still going (pid $pid); stop it first (--stop)" >&2
      exit 1
    fi
    setup
    mkdir -p logs
    printf '\n===== %s start: %s\n' "$(date -u +%FT%TZ)" "$*" >> "$LOG"
    setsid nohup bash launch/worker.sh run "$@" >> "$LOG" 2>&1 < /dev/null &
    echo "[worker] $HOSTNAME: started, log $(pwd)/$LOG" ;;
  stop)
    pid="$(running_pid)"
    if [ -z "$pid" ]; then echo "[worker] $HOSTNAME: no run going"; exit 0; fi
    kill -TERM "$pid"
    for _ in $(seq $((STOP_WAIT_S * 5))); do
      if ! kill -0 "$pid" 2>/dev/null; then echo "[worker] $HOSTNAME: stopped (pid $pid)"; exit 0; fi
      sleep 0.2
    done
    echo "error: $HOSTNAME: pid $pid still running after ${STOP_WAIT_S} s" >&2
    exit 1 ;;
  logs)
    tail -n 100 -F "$LOG" | sed -u "s/^/[$HOSTNAME] /" ;;
  *)
    echo "error: unknown worker command '${1:-}' (setup, start, run, stop, logs; see the header of $0)" >&2
    exit 2 ;;
esac
