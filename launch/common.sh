# Sourced by launch/train.sh and launch/ablate.sh: launch flags and running one command on every TPU worker.
#
# parse_launch_flags sets CONFIG, WORKDIR, TPU, ZONE, PROJECT, XPK, TPU_TYPE, DRY_RUN and EXTRA (args after `--`).
# run_remote CMD...: on a TPU VM slice (`--tpu NAME --zone Z --project P`), copies this checkout to every worker
# (`gcloud compute tpus tpu-vm scp --worker=all`), installs it with the tpu extra and runs CMD on all workers
# (`ssh --worker=all`); on an xpk cluster (`--xpk CLUSTER --tpu-type v5p-128`), creates one workload whose image
# holds this checkout (`--script-dir`) and runs the same there. With --dry-run it prints the commands.
# run_entry CMD...: what both launchers do with their entry point: run_remote it (with --distributed and the Pallas
# splash attention) when TPU flags were given, else run it locally in .venv (CPU unless JAX_PLATFORMS says otherwise)
# and set RAN_LOCALLY=1.

usage_error() { echo "error: $*" >&2; exit 2; }

# The path a local run wrote to, as the user can open it: absolute or URL paths as given, relative ones under ROOT.
shown_path() { case "$1" in /*|*://*) echo "$1" ;; *) echo "$ROOT/$1" ;; esac; }

parse_launch_flags() {
  CONFIG="" WORKDIR="" TPU="" ZONE="" PROJECT="" XPK="" TPU_TYPE="" DRY_RUN=0 EXTRA=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --config) CONFIG="${2:?--config needs a value}"; shift 2 ;;
      --workdir) WORKDIR="${2:?--workdir needs a value}"; shift 2 ;;
      --tpu) TPU="${2:?--tpu needs a value}"; shift 2 ;;
      --zone) ZONE="${2:?--zone needs a value}"; shift 2 ;;
      --project) PROJECT="${2:?--project needs a value}"; shift 2 ;;
      --xpk) XPK="${2:?--xpk needs a cluster name}"; shift 2 ;;
      --tpu-type) TPU_TYPE="${2:?--tpu-type needs a value}"; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      --) shift; EXTRA=("$@"); break ;;
      *) usage_error "unknown flag $1 (see the header of $0)" ;;
    esac
  done
  if [ -n "$TPU" ] && [ -z "$XPK" ] && { [ -z "$ZONE" ] || [ -z "$PROJECT" ]; }; then
    usage_error "--tpu needs --zone and --project"
  fi
  if [ -n "$XPK" ] && [ -z "$TPU_TYPE" ]; then usage_error "--xpk needs --tpu-type (e.g. v5p-128)"; fi
}

_run() {
  if [ "$DRY_RUN" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

run_remote() {
  local install="pip install -q -e '.[tpu,data]'" run remote_dir="varedit_jax"
  run="$(printf '%q ' "$@")"
  if [ -n "$XPK" ]; then
    _run xpk workload create --cluster "$XPK" --tpu-type "$TPU_TYPE" ${PROJECT:+--project "$PROJECT"} \
      ${ZONE:+--zone "$ZONE"} --workload "varedit-$(date +%Y%m%d-%H%M%S)" --script-dir "$ROOT" \
      --command "$install && $run"
    return
  fi
  local tarball
  tarball="$(mktemp -d)/varedit_jax.tar.gz"
  _run git -C "$ROOT" archive --format=tar.gz -o "$tarball" HEAD
  local cmd="cd $remote_dir && python3 -m venv .venv && . .venv/bin/activate && $install && $run"
  local g=(gcloud compute tpus tpu-vm --zone "$ZONE" --project "$PROJECT")
  _run "${g[@]}" scp "$tarball" "$TPU:~/varedit_jax.tar.gz" --worker=all
  _run "${g[@]}" ssh "$TPU" --worker=all \
    --command "mkdir -p $remote_dir && tar -xzf ~/varedit_jax.tar.gz -C $remote_dir && $cmd"
}

run_entry() {
  RAN_LOCALLY=0
  if [ -n "$TPU$XPK" ]; then
    run_remote "$@" --distributed --config.model.attention_impl=splash
    return
  fi
  if [ "$DRY_RUN" = 1 ]; then
    echo "source launch/env.sh \"data\"; JAX_PLATFORMS=\${JAX_PLATFORMS:-cpu} $*"
    return
  fi
  source "$ROOT/launch/env.sh" "data"
  local start
  start=$(date +%s)
  JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}" "$@"
  RAN_LOCALLY=1
  echo
  echo "done in $(( $(date +%s) - start )) s."
}
