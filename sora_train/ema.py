"""An exponential moving average of the model's weights, kept in fp32, sharded like the parameters.

With ZeRO-1/2 every rank holds every parameter whole, and so does its EMA. Under ZeRO-3 each
rank holds one partition of every parameter (`param.ds_tensor`: a contiguous slice of the
flattened parameter, padded at the end), and the EMA keeps only that slice, so no rank ever
holds a full fp32 replica. The update is local either way (no collective). Whole weights are
assembled only when asked for: `state_dict` gathers one parameter at a time (collective).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn


def _is_partitioned(param: nn.Parameter) -> bool:
    return hasattr(param, "ds_tensor")


def _local(param: nn.Parameter) -> torch.Tensor:
    """This rank's part of a parameter: its ZeRO-3 partition (1-D), or the whole of it."""
    return param.ds_tensor if _is_partitioned(param) else param


class EMA:
    """Shadow weights: ema ← decay_t·ema + (1 − decay_t)·θ, with decay_t = min(decay, (1 + n) / (10 + n))."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.names = [name for name, _ in named]
        self.shapes = {name: p.ds_shape if _is_partitioned(p) else p.shape for name, p in named}
        self.sharded = any(_is_partitioned(p) for _, p in named)
        self.shadow = {name: _local(p).detach().float().clone() for name, p in named}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow weights towards the model's current weights (this rank's part of them)."""
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        named = dict(model.named_parameters())
        for name in self.names:
            self.shadow[name].lerp_(_local(named[name]).detach().float(), 1 - decay)
        self.updates += 1

    def local_bytes(self) -> int:
        """Bytes this rank's shadow weights take."""
        return sum(t.numel() * t.element_size() for t in self.shadow.values())

    def state_dict(self, only_rank: int | None = None) -> dict[str, torch.Tensor]:
        """The whole shadow weights by parameter name (a model state dict), on CPU when sharded.

        Collective when sharded: each parameter's partitions are all-gathered in turn, so a rank
        holds one gathered parameter at a time on top of the dict it keeps. With `only_rank`,
        the other ranks keep nothing and get an empty dict.
        """
        if not self.sharded:
            return {name: tensor.contiguous() for name, tensor in self.shadow.items()}
        nccl = dist.get_backend() == "nccl"
        whole = {}
        for name in self.names:
            part = self.shadow[name].to(torch.cuda.current_device()) if nccl else self.shadow[name]
            pieces = [torch.empty_like(part) for _ in range(dist.get_world_size())]
            dist.all_gather(pieces, part)  # NCCL gathers on the GPU, even for offloaded partitions
            if only_rank is None or dist.get_rank() == only_rank:
                numel = math.prod(self.shapes[name])
                whole[name] = torch.cat(pieces)[:numel].view(self.shapes[name]).cpu()
        return whole

    def load_state_dict(self, weights: dict[str, torch.Tensor], updates: int) -> None:
        """Restore whole shadow weights saved from `state_dict` (any number of ranks) and the update count."""
        missing = set(self.names) - set(weights)
        if missing:
            raise ValueError(f"EMA weights lack {len(missing)} parameters, e.g. {sorted(missing)[0]}")
        for name in self.names:
            full = weights[name].float()
            if self.sharded:  # this rank's slice of the flattened, padded parameter
                size = self.shadow[name].numel()
                start = dist.get_rank() * size
                flat = torch.cat(
                    [full.flatten(), full.new_zeros(size * dist.get_world_size() - full.numel())]
                )
                full = flat[start : start + size]
            self.shadow[name] = full.to(self.shadow[name].device).clone()
        self.updates = updates
