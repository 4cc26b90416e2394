#!/usr/bin/env bash
# One GPU slot, at most 8 minutes on one H100/H200: the MoE layer against a dense MLP in bf16 and fp32, each
# with the experts' grouped GEMMs on torch._grouped_mm and on DeepSpeed's Triton kernel (expert_gemm torch vs
# triton; on an H100/H200 the fp32 torch rows are the fallback that reads the group offsets back to the host
# on every call, as every dtype does on an A100), a torch.profiler summary of one training step
# (DiT-MoE-B/2-8E2A, ZeRO-1) in bf16 with the default expert_gemm, the device synchronisations per step
# in fp32 with expert_gemm torch and triton, and training throughput of DiT-B/2, DiT-MoE-B/2-8E2A and
# DiT-MoE-XL/2-8E2A (micro-batch 16; needs the H200's 141 GB) with ZeRO-1/3 and compile off/on.
# Each step has its own time limit; the training runs get what is left of the 8 minutes and stop starting
# at that budget (rows say so). Full outputs first, then one combined table.
#
#   bash benchmarks/gpu_suite.sh           # on the GPU machine, from the repository
#   SMOKE=1 bash benchmarks/gpu_suite.sh   # the same steps with tiny settings on the CPU (1-2 minutes):
#                                          # the Triton cases in Triton's interpreter, in fp32 only
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=$(mktemp -d)
if [ "${SMOKE:-0}" = 1 ]; then
  MOE_BF16=(--device cpu --tokens 512 --repeats 1 --rows all --expert-gemm torch)  # bf16 tl.dot is wrong interpreted
  MOE_FP32=(--device cpu --tokens 128 --repeats 1 --rows tiny --expert-gemm torch,triton)
  PROFILE=(--preset tiny --global-batch-size 8 --micro-batch-size 8 --warmup 1)
  PROFILE_BF16=(--precision fp32)  # the trainer's bf16 on the CPU is only slower
  TRITON_ENV=TRITON_INTERPRET=1    # Triton runs CPU tensors only in its interpreter
  TRAIN=(--presets tiny --precision fp32 --zero-stages 1 --compile off --global-batch-size 8 --micro-batch-size 8
         --steps 4 --log-every 2 --time-budget-s 200)
else
  MOE_BF16=(--device cuda --tokens 16384 --rows all --expert-gemm torch,triton)
  MOE_FP32=(--device cuda --tokens 16384 --rows presets --expert-gemm torch,triton)
  PROFILE=(--preset DiT-MoE-B/2-8E2A --zero-stage 1 --global-batch-size 64 --micro-batch-size 64)
  PROFILE_BF16=(--precision bf16)
  TRITON_ENV=
  TRAIN=(--steps 10 --log-every 5)
fi
start=$SECONDS

step() {  # step NAME LIMIT_S COMMAND...: the command's output in $OUT/NAME.txt, ended by its exit code if not 0
  local name=$1 limit=$2
  shift 2
  [ "${SMOKE:-0}" = 1 ] && limit=600  # the CPU is slower; the limits are for the GPU
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1 || echo "exit code $? ($name)" >> "$OUT/$name.txt"
}

# $TRITON_ENV unquoted: empty on the GPU, one VAR=value word for env in the smoke run
step moe_bf16 90 env $TRITON_ENV "$PY" benchmarks/moe_layer.py --dtype bf16 "${MOE_BF16[@]}"
step moe_fp32 75 env $TRITON_ENV "$PY" benchmarks/moe_layer.py --dtype fp32 "${MOE_FP32[@]}"
step profile 75 "$PY" benchmarks/profile_step.py "${PROFILE[@]}" "${PROFILE_BF16[@]}"
step profile_fp32_torch 70 "$PY" benchmarks/profile_step.py "${PROFILE[@]}" --precision fp32 --expert-gemm torch
step profile_fp32_triton 75 env $TRITON_ENV "$PY" benchmarks/profile_step.py "${PROFILE[@]}" --precision fp32 \
  --expert-gemm triton
if [ "${SMOKE:-0}" != 1 ]; then  # what the steps above left of 8 minutes (the last run ends at the budget)
  budget=$((460 - (SECONDS - start)))
  TRAIN+=(--time-budget-s $((budget > 1 ? budget : 1)))  # 0 would mean no budget
fi
"$PY" benchmarks/train_throughput.py "${TRAIN[@]}" > "$OUT/throughput.txt" 2>&1 || echo "exit code $?" >> "$OUT/throughput.txt"
for name in moe_bf16 moe_fp32 profile profile_fp32_torch profile_fp32_triton throughput; do
  echo "== $name"
  grep -v -e "\[WARNING\]" -e "FutureWarning" -e "return func(" -e "USDT:" "$OUT/$name.txt"
done
echo
echo "| benchmark | case | result |"
echo "| --- | --- | --- |"
# rows "name dtype expert_gemm moe-ms dense-ms ratio"; the routing variants (names with spaces) stay above
awk 'NF == 6 && $2 ~ /^(fp32|bf16)$/ {
       printf "| moe_layer | %s, %s, expert_gemm %s | MoE %s ms, dense %s ms, ratio %s |\n", $1, $2, $3, $4, $5, $6}
     /^exit code/ {print "| moe_layer | | " $0 " |"}' "$OUT/moe_bf16.txt" "$OUT/moe_fp32.txt"
awk 'FNR == 1 {config = ""} /, ZeRO-/ {config = $0}
     /^step wall|^device synchronisations/ {print "| profile_step | " config " | " $0 " |"}
     /^exit code/ {print "| profile_step | | " $0 " |"}' "$OUT/profile.txt" "$OUT/profile_fp32_torch.txt" \
  "$OUT/profile_fp32_triton.txt"
sed -n '/^| model | ZeRO/,$p' "$OUT/throughput.txt" | tail -n +3 | awk -F' *[|] *' '
  $6 == "" {printf "| train_throughput | %s, ZeRO-%s, compile %s | %s |\n", $2, $3, $4, $5; next}
  {printf "| train_throughput | %s, ZeRO-%s, compile %s | %s samples/s, %s TFLOP/s, MFU %s, peak %s GiB |\n",
     $2, $3, $4, $5, $6, $7, $8}'
grep "^exit code" "$OUT/throughput.txt" | sed 's/^/| train_throughput | | /; s/$/ |/'
echo "suite: $((SECONDS - start)) s; full outputs in $OUT"
