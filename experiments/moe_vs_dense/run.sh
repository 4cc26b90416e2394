#!/usr/bin/env bash
# The MoE-versus-dense study: every arm (*.toml here) with 3 seeds, then one figure and one table.
#
#   experiments/moe_vs_dense/run.sh [OUT_ROOT]          # on the embedded digits, one process per run
#
# On a cluster the same configs take a larger preset and latent shards; flags win over the files:
#   LAUNCH="torchrun --nproc_per_node 8" EXTRA="--preset DiT-MoE-S/2-8E2A --data /data/latents \
#     --global-batch-size 256 --steps 400000 --val-data /data/val_latents" experiments/moe_vs_dense/run.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="${1:-runs/moe_vs_dense}"
launch="${LAUNCH:-python}"
seeds="${SEEDS:-0 1 2}"
runs=()
for config in "$here"/*.toml; do
  arm="$(basename "$config" .toml)"
  for seed in $seeds; do
    out="$root/$arm-seed$seed"
    if [ ! -f "$out/eval.json" ]; then  # a rerun skips finished digits runs and resumes the others
      # shellcheck disable=SC2086
      $launch -m ditmoe.train --config "$config" --seed "$seed" --out "$out" --resume auto ${EXTRA:-}
    fi
    runs+=("$out")
  done
done
python tools/compare_runs.py "${runs[@]}" --out "$root"
