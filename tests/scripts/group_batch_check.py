"""The ranks of a sequence-parallel group compare their batches, on 2 processes (SP=2).

Each rank writes `OUT.RANK.json`: whether the same keys passed, and the message each rank got when
rank 1 held another batch (a sample skipped on one rank only) and when it held fewer samples.
Usage: torchrun --nproc-per-node 2 group_batch_check.py OUT
"""

from __future__ import annotations

import json
import sys

import torch.distributed as dist

from sora_train.parallel.dist import init_distributed, leave_process, shutdown_distributed
from sora_train.parallel.sequence import GroupBatchesDiffer, check_group_batch


def outcome(keys: list[str], group, device) -> str:
    try:
        check_group_batch(keys, group, device)
    except GroupBatchesDiffer as error:
        return str(error)
    return "same"


def main(out: str) -> None:
    info = init_distributed(sequence_parallel=2)
    rank = dist.get_rank()
    report = {
        "same": outcome(["a", "b", "c"], info.sequence_group, info.device),
        "other_sample": outcome(["a", "b", "c" if rank == 0 else "d"], info.sequence_group, info.device),
        "fewer": outcome(["a", "b", "c"][: 3 - rank], info.sequence_group, info.device),
    }
    with open(f"{out}.{rank}.json", "w") as file:
        json.dump(report, file)
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
    leave_process(0)
