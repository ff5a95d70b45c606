#!/usr/bin/env bash
# Train with torchrun on this node: one process per GPU (or NPROC processes on CPU).
#
#   launch/torchrun.sh [overrides...]            e.g. launch/torchrun.sh experiment=demo train.max_steps=2000
#   NPROC=2 launch/torchrun.sh model=S data=shards data.train=/data/train
#
# The run dir is computed here once (SORA_RUN_DIR, default runs/<timestamp>) so every rank
# writes to the same place; set SORA_RUN_DIR yourself to resume a run in place.
#
# One of several nodes (launch/slurm.sbatch runs this on each): NNODES and RDZV_ENDPOINT=host:port
# of the first node (RDZV_ID names the job) switch from --standalone to a c10d rendezvous.
#
# Signals: SIGUSR1 (SLURM's warning ahead of the time limit) and SIGTERM (preemption) go to the
# launcher, torchrun with the two relayed (sora_train/launcher.py): the training processes
# checkpoint at the next step and stop, whether the signal reached this script, the launcher or
# every process of the step. SIGINT stops them at once. Exit code 75 means "stopped on a signal
# after checkpointing: requeue".
set -euo pipefail

PYTHON=${PYTHON:-python3}
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [[ "${NPROC}" -gt 0 ]] || NPROC=1
fi
export SORA_RUN_DIR=${SORA_RUN_DIR:-runs/$(date +%Y-%m-%d_%H-%M-%S)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [[ -n "${NNODES:-}" ]]; then
  # c10d deals the ranks itself; NODE_RANK only names this node in the log
  rendezvous=(--nnodes "${NNODES}" --rdzv-backend c10d --rdzv-id "${RDZV_ID:-sora_train}"
    --rdzv-endpoint "${RDZV_ENDPOINT:?RDZV_ENDPOINT=host:port is needed with NNODES}")
  echo "run dir ${SORA_RUN_DIR}: node ${NODE_RANK:-?} of ${NNODES}, ${NPROC} processes" >&2
else
  rendezvous=(--standalone)
  echo "run dir ${SORA_RUN_DIR}: ${NPROC} processes" >&2
fi
started=$(date +%s)
"${PYTHON}" -m sora_train.launcher "${rendezvous[@]}" --nproc-per-node "${NPROC}" -m sora_train.cli "$@" &
launcher=$!
trap 'kill -USR1 "${launcher}" 2>/dev/null || true' USR1
trap 'kill -TERM "${launcher}" 2>/dev/null || true' TERM
trap 'kill -INT "${launcher}" 2>/dev/null || true' INT
code=0
while :; do
  wait "${launcher}" && code=0 || code=$?  # a trapped signal interrupts the wait (status > 128)
  kill -0 "${launcher}" 2>/dev/null || break
done
if [[ ${code} -gt 128 ]]; then  # interrupted just as the launcher ended: fetch its own status
  wait "${launcher}" && code=0 || code=$?
fi
# torchrun reports any worker's exit as 1; a preempted run leaves RUN_DIR/preempted.json.
if [[ ${code} -ne 0 ]] && "${PYTHON}" -m sora_train.preemption "${SORA_RUN_DIR}" "${started}"; then
  exit 75
fi
exit "${code}"
