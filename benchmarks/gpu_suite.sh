#!/usr/bin/env bash
# One GPU slot, at most 8 minutes on one H100/H200: the MoE layer in bf16, a torch.profiler summary of
# one training step (DiT-MoE-B/2-8E2A, ZeRO-1), and training throughput of DiT-B/2, DiT-MoE-B/2-8E2A
# and DiT-MoE-XL/2-8E2A (micro-batch 16; needs the H200's 141 GB) with ZeRO-1/3 and compile off/on.
# Each step has its own time limit; the training runs stop starting at their budget (rows say so).
# Full outputs first, then one combined table.
#
#   bash benchmarks/gpu_suite.sh           # on the GPU machine, from the repository
#   SMOKE=1 bash benchmarks/gpu_suite.sh   # the same steps with tiny settings on the CPU
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=$(mktemp -d)
if [ "${SMOKE:-0}" = 1 ]; then
  MOE=(--device cpu --dtype fp32 --tokens 512 --repeats 1)
  PROFILE=(--preset tiny --precision fp32 --global-batch-size 8 --micro-batch-size 8 --warmup 1)
  TRAIN=(--presets tiny --precision fp32 --zero-stages 1 --compile off --global-batch-size 8 --micro-batch-size 8
         --steps 4 --log-every 2 --time-budget-s 200)
else
  MOE=(--device cuda --dtype bf16 --tokens 16384)
  PROFILE=(--preset DiT-MoE-B/2-8E2A --zero-stage 1 --global-batch-size 64 --micro-batch-size 64)
  TRAIN=(--steps 10 --log-every 5 --time-budget-s 300)
fi
start=$SECONDS
timeout 75 "$PY" benchmarks/moe_layer.py "${MOE[@]}" > "$OUT/moe_layer.txt" 2>&1 || echo "exit code $?" >> "$OUT/moe_layer.txt"
timeout 90 "$PY" benchmarks/profile_step.py "${PROFILE[@]}" > "$OUT/profile.txt" 2>&1 || echo "exit code $?" >> "$OUT/profile.txt"
"$PY" benchmarks/train_throughput.py "${TRAIN[@]}" > "$OUT/throughput.txt" 2>&1 || echo "exit code $?" >> "$OUT/throughput.txt"
for name in moe_layer profile throughput; do
  echo "== $name"
  grep -v -e "\[WARNING\]" -e "FutureWarning" -e "return func(" -e "USDT:" "$OUT/$name.txt"
done
echo
echo "| benchmark | case | result |"
echo "| --- | --- | --- |"
awk '/^DiT-MoE-/ {printf "| moe_layer | %s | MoE %s ms, dense %s ms, ratio %s |\n", $1, $2, $3, $4}
     /^exit code/ {print "| moe_layer | | " $0 " |"}' "$OUT/moe_layer.txt"
awk '/, ZeRO-/ {config = $0} /^step wall|^device synchronisations/ {print "| profile_step | " config " | " $0 " |"}
     /^exit code/ {print "| profile_step | | " $0 " |"}' "$OUT/profile.txt"
sed -n '/^| model | ZeRO/,$p' "$OUT/throughput.txt" | tail -n +3 | awk -F' *[|] *' '
  $6 == "" {printf "| train_throughput | %s, ZeRO-%s, compile %s | %s |\n", $2, $3, $4, $5; next}
  {printf "| train_throughput | %s, ZeRO-%s, compile %s | %s samples/s, %s TFLOP/s, MFU %s, peak %s GiB |\n",
     $2, $3, $4, $5, $6, $7, $8}'
grep "^exit code" "$OUT/throughput.txt" | sed 's/^/| train_throughput | | /; s/$/ |/'
echo "suite: $((SECONDS - start)) s; full outputs in $OUT"
