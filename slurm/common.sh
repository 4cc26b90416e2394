# Shared by the slurm/*.sbatch templates, sourced by the batch shell (see docs/slurm.md). Sourcing it
# installs the USR1 trap; the functions read the template's variables (REPO, OUT, ...).

PREEMPTED=0 USR1_COUNT=0 STEP_PID= STEP_SIGNAL=USR1
trap on_usr1 USR1  # see run_preemptible

# setup_env: working directory, rendezvous (first node, port from the job id), threads, NCCL/PyTorch.
setup_env() {
  cd "$REPO"
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
  unset RANK WORLD_SIZE LOCAL_RANK  # from the submitting shell, if any: the ranks come from srun
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
  MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
  export MASTER_ADDR MASTER_PORT
  if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
    export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK  # srun >= 22.05 no longer inherits --cpus-per-task
  fi
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  export PYTHONUNBUFFERED=1
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=1 NCCL_ASYNC_ERROR_HANDLING=1  # a hung collective aborts the job
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
  PYTHON=${PYTHON:-python}
}

# start_log DIR: from here on, everything the job prints is appended to DIR/<job name>-<job id>.log
# (one file across requeues); the batch output file only names it.
start_log() {
  mkdir -p "$1"
  LOG="$1/${SLURM_JOB_NAME}-${SLURM_JOB_ID}.log"
  echo "logging to $LOG"
  exec >>"$LOG" 2>&1
}

# log_job VAR...: a header for this start of the job: ids, nodes, rendezvous, git revision, settings.
log_job() {
  local rev dirty var
  rev=$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)
  dirty=$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null | wc -l || true)
  echo "===== $(date -Is) job $SLURM_JOB_ID ($SLURM_JOB_NAME) start $((${SLURM_RESTART_COUNT:-0} + 1))"
  echo "nodes $SLURM_JOB_NODELIST ($SLURM_NNODES), tasks $SLURM_NTASKS, rendezvous $MASTER_ADDR:$MASTER_PORT"
  echo "git $rev ($dirty modified tracked files) in $REPO"
  for var in "$@"; do
    echo "  $var=${!var}"
  done
}

# run_preemptible SIGNAL COMMAND...: run COMMAND (an srun) in the background so that the batch shell's
# USR1 trap can run while it does: SLURM sends USR1 before the time limit (--signal=B:USR1@N), and so
# does `scancel --signal=USR1 --batch`. The trap forwards SIGNAL to the step; once the step has
# exited, the job is requeued (it starts again from the top) instead of ending.
run_preemptible() {
  local rc seen
  STEP_SIGNAL=$1
  shift
  if (( PREEMPTED )); then
    requeue "before the step started"
  fi
  "$@" &
  STEP_PID=$!
  while :; do
    seen=$USR1_COUNT
    rc=0
    wait "$STEP_PID" || rc=$?
    (( rc > 128 && USR1_COUNT != seen )) || break  # else the trap interrupted wait: the step still runs
  done
  STEP_PID=
  if (( PREEMPTED )); then
    requeue "after the step exited ($rc)"
  fi
  return "$rc"
}

on_usr1() {
  USR1_COUNT=$((USR1_COUNT + 1))
  PREEMPTED=1
  echo "$(date -Is) batch shell got USR1${STEP_PID:+: sending SIG$STEP_SIGNAL to the job step}"
  if [[ -n $STEP_PID ]]; then
    kill -s "$STEP_SIGNAL" "$STEP_PID" 2>/dev/null || true
  fi
}

requeue() {
  echo "$(date -Is) preempted $1: requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
}

# add_arg FLAG VALUE: append "FLAG VALUE" to ARGS when VALUE is not empty.
add_arg() {
  if [[ -n $2 ]]; then
    ARGS+=("$1" "$2")
  fi
}

# train_main: python -m ditmoe.train on every task from the template's variables, resuming from the
# latest checkpoint in OUT (none on the first start). USR1 makes the ranks checkpoint at the next step
# boundary and exit; the job is then requeued and continues.
train_main() {
  OBJECTIVE=${OBJECTIVE:-}  # templates without it keep the trainer's default
  setup_env
  start_log "$OUT/logs"
  ARGS=(--preset "$PRESET" --out "$OUT" --resume auto)
  add_arg --data "$DATA"
  add_arg --steps "$STEPS"
  add_arg --global-batch-size "$GLOBAL_BATCH"
  add_arg --micro-batch-size "$MICRO_BATCH"
  add_arg --precision "$PRECISION"
  add_arg --objective "$OBJECTIVE"
  add_arg --deepspeed-config "$DS_CONFIG"
  add_arg --ep-size "$EP_SIZE"
  add_arg --activation-checkpointing "$ACT_CKPT"
  add_arg --set "${INPUT_SIZE:+model.input_size=$INPUT_SIZE}"
  local extra
  read -r -a extra <<<"$EXTRA_ARGS"
  ARGS+=("${extra[@]}")
  log_job PRESET DATA OUT STEPS GLOBAL_BATCH MICRO_BATCH PRECISION OBJECTIVE DS_CONFIG EP_SIZE ACT_CKPT \
    INPUT_SIZE EXTRA_ARGS PYTHON OMP_NUM_THREADS
  echo "command: $PYTHON -m ditmoe.train ${ARGS[*]}"
  echo "resolved config:"
  "$PYTHON" -c 'import json, sys
from ditmoe.train.__main__ import parse_settings
_, config = parse_settings(sys.argv[1:])  # bad settings exit with a clear error
print(json.dumps({"train": config.to_dict(), "model": config.model_config().to_dict()}))' "${ARGS[@]}"
  run_preemptible USR1 srun --label --kill-on-bad-exit=1 "$PYTHON" -m ditmoe.train "${ARGS[@]}"
}
