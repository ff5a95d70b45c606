"""A guard against weights that drift apart across data-parallel ranks.

With ZeRO-1/2 every rank holds every parameter whole, and after each step all copies must be
identical; if gradients silently failed to synchronise (or code changed weights on one rank),
ranks would train different models without any error. At each checkpoint the ranks compare a
checksum of every parameter. Under ZeRO-3 each rank holds a different shard, so there is
nothing to compare.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class ReplicasDiverged(RuntimeError):
    """Data-parallel ranks hold different weights."""


@torch.no_grad()
def parameter_checksums(module: nn.Module) -> torch.Tensor:
    """(P,) float64: the sum of each parameter's values, in parameter order."""
    return torch.stack([p.detach().double().sum() for p in module.parameters()])


def check_replicas(module: nn.Module, zero_stage: int, step: int) -> torch.Tensor | None:
    """Raise ReplicasDiverged unless every rank holds the same weights (collective; ZeRO-1/2 only).

    Returns this rank's checksums (None under ZeRO-3), to be kept with the checkpoint.
    """
    if zero_stage == 3:
        return None
    mine = parameter_checksums(module)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    names = [name for name, _ in module.named_parameters()]
    for rank, theirs in enumerate(gathered):
        differs = (theirs != gathered[0]).nonzero().flatten().tolist()
        if differs:
            raise ReplicasDiverged(
                f"at step {step} rank {rank} holds different weights from rank 0 in {len(differs)} "
                f"parameter(s), e.g. {names[differs[0]]}: gradients are not synchronised across ranks"
            )
    return mine.cpu()
