#!/usr/bin/env bash
# Trains a VAREdit model: locally (CPU / one GPU host) or on every worker of a Cloud TPU VM slice or an xpk cluster.
#
#   bash launch/train.sh                                   # the tiny CPU default end to end (toy data, toy tokenizer,
#                                                          # varedit_tiny SAR, checkpoints, sample edits, metrics)
#   bash launch/train.sh --config configs/varedit_2b_256.py --workdir gs://bucket/runs/2b_256 \
#       --tpu my-v5p-128 --zone us-east5-a --project my-proj -- --config.init_checkpoint=... --config.data.paths=...
#   bash launch/train.sh --config ... --workdir gs://... --xpk my-cluster --tpu-type v5p-128 [--slices 2]
#   bash launch/train.sh --recipe RECIPE --workdir gs://... [--tpu ... | --xpk ...]   # every stage of a recipe
#   the same target flags plus --logs (follow every worker's log) or --stop (SIGTERM: every worker saves and exits)
#   add --dry-run to print the commands instead of running them; flags after `--` go to varedit_jax.train (or
#   varedit_jax.recipe). All launch flags: launch/common.sh.
#
# Local runs create/reuse .venv (launch/env.sh). Remote runs ship the committed tree to every worker, install it
# there (Python 3.11 venv, `tpu` extra) and start `python -m varedit_jax.train --distributed` detached on all workers
# at once. A re-run of the same command resumes from the workdir's newest checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
source launch/common.sh
parse_launch_flags "$@"
if [ -n "$RECIPE" ]; then
  WORKDIR="${WORKDIR:-runs/$(basename "${RECIPE%%:*}" .py)}"
  run_entry python -m varedit_jax.recipe --recipe "$RECIPE" --workdir "$WORKDIR" "${EXTRA[@]}"
else
  CONFIG="${CONFIG:-configs/varedit_tiny.py}"
  WORKDIR="${WORKDIR:-runs/$(basename "${CONFIG%%:*}" .py)}"
  run_entry python -m varedit_jax.train --config "$CONFIG" --workdir "$WORKDIR" "${EXTRA[@]}"
fi
if [ "$RAN_LOCALLY" = 1 ]; then
  echo "Outputs in $(shown_path "$WORKDIR"):"
  echo "  checkpoints/   (edit: python -m varedit_jax.edit --checkpoint $WORKDIR --image IN.png --instruction ... --out OUT.png)"
  echo "  metrics.jsonl, tb/ (tensorboard --logdir $WORKDIR/tb), samples/*.png (held-out edits), summary.json"
fi
