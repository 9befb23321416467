# Sourced by launch/train.sh and launch/ablate.sh: launch flags, and running an entry point locally or on every
# worker of a Cloud TPU VM slice or an xpk (GKE) cluster.
#
# Flags (parse_launch_flags; a bad flag exits 2 with one line):
#   --config C   --workdir DIR   --dry-run (print the commands)   -- ARGS (to the entry point)   [train.sh: --recipe R]
#   TPU VM slice:  --tpu NAME --zone Z --project P
#   xpk cluster:   --xpk CLUSTER --tpu-type T [--slices N] [--restarts N] [--name WORKLOAD] [--project P] [--zone Z]
#   either:        --logs (follow every worker's log)   --stop (SIGTERM on every worker: they save a checkpoint, exit)
#                  --allow-dirty (ship HEAD although tracked files have uncommitted changes; refused otherwise)
# Remote runs ship the committed tree (`git archive HEAD`). TPU VMs: copied to ~/varedit_jax on every worker
# (`gcloud compute tpus tpu-vm scp/ssh --worker=all`), where launch/worker.sh makes a Python 3.11 venv with uv and
# starts the entry point detached (logs in ~/varedit_jax/logs/). xpk: one workload (named after the workdir unless
# --name) whose image is python:3.11 plus the tree (`--script-dir`), running the same setup in the foreground of
# each pod; --slices N spans N slices (`--num-slices`, and config.mesh.slices = N: the mesh's "dcn" axis);
# --logs is `kubectl logs -f` of its pods, --stop `xpk workload delete` (pods get SIGTERM, 900 s grace).
# Either way the entry point gets --distributed and the Pallas splash attention; a re-run of the same command
# resumes from the workdir's newest checkpoint.
# run_entry CMD...: the above for CMD when TPU flags were given, else CMD locally in .venv (CPU unless JAX_PLATFORMS
# says otherwise); sets RAN_LOCALLY=1 after a local run.

usage_error() { echo "error: $*" >&2; exit 2; }

# The path a local run wrote to, as the user can open it: absolute or URL paths as given, relative ones under ROOT.
shown_path() { case "$1" in /*|*://*) echo "$1" ;; *) echo "$ROOT/$1" ;; esac; }

_value() {  # _value FLAG "$@": the flag's value, or a usage error
  if [ $# -lt 2 ] || [ -z "$2" ] || [[ "$2" == --* ]]; then usage_error "$1 needs a value"; fi
}

_count() {  # _count FLAG VALUE MIN: VALUE must be an integer >= MIN
  if ! [[ "$2" =~ ^[0-9]+$ ]] || [ "$2" -lt "$3" ]; then usage_error "$1 must be an integer >= $3, got '$2'"; fi
}

parse_launch_flags() {
  CONFIG="" RECIPE="" WORKDIR="" TPU="" ZONE="" PROJECT="" XPK="" TPU_TYPE="" SLICES="" RESTARTS="" NAME=""
  ACTION=start DRY_RUN=0 ALLOW_DIRTY=0 EXTRA=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --config|--recipe|--workdir|--tpu|--zone|--project|--xpk|--tpu-type|--slices|--restarts|--name)
        _value "$@"
        local var="${1#--}"
        var="${var//-/_}"
        printf -v "${var^^}" '%s' "$2"
        shift 2 ;;
      --logs) ACTION=logs; shift ;;
      --stop) ACTION=stop; shift ;;
      --dry-run) DRY_RUN=1; shift ;;
      --allow-dirty) ALLOW_DIRTY=1; shift ;;
      --) shift; EXTRA=("$@"); break ;;
      *) usage_error "unknown flag $1 (see the header of $0)" ;;
    esac
  done
  if [ -n "$CONFIG" ] && [ -n "$RECIPE" ]; then usage_error "give --config or --recipe, not both"; fi
  if [ -n "$TPU" ] && [ -n "$XPK" ]; then usage_error "give --tpu (a TPU VM slice) or --xpk (a cluster), not both"; fi
  if [ -n "$TPU" ] && { [ -z "$ZONE" ] || [ -z "$PROJECT" ]; }; then usage_error "--tpu needs --zone and --project"; fi
  if [ -n "$XPK" ] && [ -z "$TPU_TYPE" ]; then usage_error "--xpk needs --tpu-type (e.g. v5p-128)"; fi
  if [ -z "$XPK" ]; then
    local flag
    for flag in TPU_TYPE SLICES RESTARTS NAME; do
      if [ -n "${!flag}" ]; then usage_error "--$(echo "${flag,,}" | tr _ -) needs --xpk"; fi
    done
  fi
  if [ -z "$TPU$XPK" ] && [ "$ACTION" != start ]; then
    usage_error "--$ACTION needs --tpu or --xpk (a local run logs to the terminal; Ctrl-C stops it with a save)"
  fi
  if [ -n "$SLICES" ]; then _count --slices "$SLICES" 1; fi
  if [ -n "$RESTARTS" ]; then _count --restarts "$RESTARTS" 0; fi
  if [ -n "$NAME" ] && ! [[ "$NAME" =~ ^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$ ]]; then
    usage_error "--name must be lowercase letters, digits and '-', start with a letter, at most 40 characters"
  fi
  return 0
}

_run() {
  if [ "$DRY_RUN" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

# ------------------------------------------------------------------------------------------------ remote runs
_check_committed() {  # remote runs ship HEAD: refuse (or, with --allow-dirty / --dry-run, warn) on tracked changes
  local changed
  changed="$(git -C "$ROOT" status --porcelain --untracked-files=no)"
  [ -z "$changed" ] && return 0
  if [ "$ALLOW_DIRTY" = 1 ] || [ "$DRY_RUN" = 1 ]; then
    echo "WARNING: uncommitted changes are NOT shipped (the workers get HEAD $(git -C "$ROOT" rev-parse --short HEAD)):" >&2
    echo "$changed" >&2
    return 0
  fi
  echo "error: uncommitted changes (remote runs ship the committed tree, git archive HEAD); commit them, or pass" \
       "--allow-dirty to ship HEAD without them:" >&2
  echo "$changed" >&2
  exit 1
}

_workload_name() {  # xpk: --name, else varedit-<workdir's last part> (lowercase, [-a-z0-9], <= 40 characters)
  if [ -n "$NAME" ]; then echo "$NAME"; return; fi
  local base
  base="$(basename "$WORKDIR" | tr 'A-Z_.' 'a-z--' | tr -cd 'a-z0-9-')"
  echo "varedit-$base" | cut -c1-40 | sed 's/-*$//'
}

_remote_start() {  # _remote_start CMD...: ship HEAD and start CMD on every worker
  local run tmp
  run="$(printf '%q ' "$@")"
  run="${run% }"
  _check_committed
  case "$WORKDIR" in
    gs://*) ;;
    *) echo "WARNING: workdir $WORKDIR is not on gs://: every worker must see the same directory (a shared" \
            "mount), or checkpoints break" >&2 ;;
  esac
  tmp="$(mktemp -d)"
  if [ -n "$XPK" ]; then
    _run mkdir -p "$tmp/varedit_jax"
    if [ "$DRY_RUN" = 1 ]; then
      echo "git -C $(printf '%q' "$ROOT") archive HEAD | tar -x -C $tmp/varedit_jax"
    else
      git -C "$ROOT" archive HEAD | tar -x -C "$tmp/varedit_jax"
    fi
    _run xpk workload create --cluster "$XPK" --workload "$(_workload_name)" --tpu-type "$TPU_TYPE" \
      --num-slices "${SLICES:-1}" ${PROJECT:+--project "$PROJECT"} ${ZONE:+--zone "$ZONE"} \
      --base-docker-image python:3.11 --script-dir "$tmp/varedit_jax" --termination-grace-period-seconds 900 \
      --max-restarts "${RESTARTS:-0}" --command "bash launch/worker.sh setup && exec bash launch/worker.sh run $run"
  else
    local g=(gcloud compute tpus tpu-vm)
    _run git -C "$ROOT" archive --format=tar.gz -o "$tmp/varedit_jax.tar.gz" HEAD
    _run "${g[@]}" scp "$tmp/varedit_jax.tar.gz" "$TPU:varedit_jax.tar.gz" --worker=all --zone "$ZONE" \
      --project "$PROJECT"
    _run "${g[@]}" ssh "$TPU" --worker=all --zone "$ZONE" --project "$PROJECT" --command \
      "mkdir -p varedit_jax && tar -xzf varedit_jax.tar.gz -C varedit_jax && bash varedit_jax/launch/worker.sh start $run"
  fi
  rm -rf "$tmp"
}

_remote_action() {  # logs | stop on every worker
  if [ -n "$XPK" ]; then
    local name
    name="$(_workload_name)"
    if [ "$1" = logs ]; then
      _run kubectl logs -f --prefix --tail=100 --max-log-requests=1000 -c jax-tpu \
        -l "jobset.sigs.k8s.io/jobset-name=$name"
    else
      _run xpk workload delete --cluster "$XPK" --workload "$name" ${PROJECT:+--project "$PROJECT"} \
        ${ZONE:+--zone "$ZONE"}
    fi
  else
    _run gcloud compute tpus tpu-vm ssh "$TPU" --worker=all --zone "$ZONE" --project "$PROJECT" \
      --command "bash varedit_jax/launch/worker.sh $1"
  fi
}

run_entry() {
  RAN_LOCALLY=0
  if [ -n "$TPU$XPK" ]; then
    if [ "$ACTION" != start ]; then _remote_action "$ACTION"; return; fi
    _remote_start "$@" --distributed --config.model.attention_impl=splash ${SLICES:+--config.mesh.slices=$SLICES}
    return
  fi
  if [ "$DRY_RUN" = 1 ]; then
    echo "source launch/env.sh data; JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} $(printf '%q ' "$@")"
    echo "(dry run) outputs would be in $(shown_path "$WORKDIR")"
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
