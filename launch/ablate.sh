#!/usr/bin/env bash
# Conditioning ablation sweep (full / finest / SAR): one model per strategy, same budget, seeds and data order, each
# evaluated; prints the table (Markdown; CSV + JSON beside it). Locally or on every worker of a TPU slice / xpk cluster.
#
#   bash launch/ablate.sh                                  # the tiny CPU sweep on the toy task (<= 30 min on 2 cores)
#   bash launch/ablate.sh -- --seeds 0,1,2                 # flags after `--` go to varedit_jax.ablate
#   bash launch/ablate.sh --config configs/varedit_2b_256.py -- --plan-only     # lengths, sizes, FLOPs; no training
#   bash launch/ablate.sh --config configs/varedit_2b_256.py --workdir /mnt/runs/ablate_2b \
#       --tpu my-v5p-128 --zone us-east5-a --project my-proj -- --config.init_checkpoint=... --config.data.paths=...
#   add --dry-run to print the commands instead of running them; --logs / --stop as launch/train.sh. All launch flags:
#   launch/common.sh.
#
# Local runs create/reuse .venv (launch/env.sh). A re-run of the same command resumes: finished runs and evaluations
# are reused, an interrupted run continues from its newest checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
source launch/common.sh
parse_launch_flags "$@"
if [ -n "$RECIPE" ]; then usage_error "--recipe is launch/train.sh's"; fi
CONFIG="${CONFIG:-configs/varedit_tiny.py}"
WORKDIR="${WORKDIR:-runs/ablate_$(basename "${CONFIG%%:*}" .py | sed 's/^varedit_//')}"
run_entry python -m varedit_jax.ablate --config "$CONFIG" --workdir "$WORKDIR" "${EXTRA[@]}"
if [ "$RAN_LOCALLY" = 1 ]; then
  echo "Outputs in $(shown_path "$WORKDIR"): results.{md,csv,json}, grids/, <strategy>/seed<k>/"
fi
