#!/usr/bin/env bash
# Train on one node with torchrun: one process per GPU (or NPROC processes on CPU).
#
#   launch/torchrun.sh [overrides...]            e.g. launch/torchrun.sh experiment=demo train.max_steps=2000
#   NPROC=2 launch/torchrun.sh model=S data=shards data.train=/data/train
#
# The run dir is computed here once (SORA_RUN_DIR, default runs/<timestamp>) so every rank
# writes to the same place; set SORA_RUN_DIR yourself to resume a run in place.
set -euo pipefail

PYTHON=${PYTHON:-python3}
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [[ "${NPROC}" -gt 0 ]] || NPROC=1
fi
export SORA_RUN_DIR=${SORA_RUN_DIR:-runs/$(date +%Y-%m-%d_%H-%M-%S)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

echo "run dir ${SORA_RUN_DIR}: ${NPROC} processes" >&2
exec "${PYTHON}" -m torch.distributed.run --standalone --nproc-per-node "${NPROC}" -m sora_train.train "$@"
