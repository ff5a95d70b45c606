"""An exponential moving average of the fp32 master weights, sharded like the optimizer's copy.

The EMA follows the optimizer's fp32 master weights, not the module's weights: in bf16 the module
holds a rounded copy, and averaging that would add its rounding error to every update. Each rank
averages only the part of the master weights its optimizer holds, so no rank keeps a whole fp32
replica and the update needs no collective:

- ZeRO-1/2: DeepSpeed's optimizer holds one contiguous fp32 slice of the flattened parameters per
  rank; each parameter links the piece of that slice it overlaps (`param._hp_mapping`: its
  `hp_fragment` and where that fragment starts in the flattened parameter). A rank may hold a
  piece of a parameter, all of it or none.
- ZeRO-3: each rank holds one partition of every parameter (`param.ds_tensor`: a contiguous slice
  of the flattened parameter, padded at the end), and the optimizer the matching fp32 partition.
- A plain module (no DeepSpeed optimizer): the whole parameter, as fp32.

Whole weights are assembled only when asked for (`state_dict`, collective when sharded): one
parameter at a time, so a rank holds one assembled parameter at a time on top of the dict it keeps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

Placement = Literal["whole", "fragment", "partition"]


@dataclass(frozen=True)
class Slice:
    """Where this rank's part of one parameter sits in the flattened parameter."""

    start: int
    numel: int


def placement_of(params: list[nn.Parameter]) -> Placement:
    """How the optimizer holds these parameters' fp32 master weights across ranks."""
    if any(hasattr(p, "ds_tensor") for p in params):
        return "partition"
    if any(hasattr(p, "_dp_group") and hasattr(p, "_hp_mapping") for p in params):
        return "fragment"  # DeepSpeed linked every parameter, with or without a piece on this rank
    return "whole"


def master_part(param: nn.Parameter, placement: Placement) -> torch.Tensor:
    """This rank's part of `param`'s fp32 master weights (1-D unless whole; empty when it holds none)."""
    if placement == "fragment":
        mapping = param._hp_mapping
        return param.new_empty(0, dtype=torch.float32) if mapping is None else mapping.hp_fragment
    if placement == "partition":
        optimizer = getattr(param, "_z3_optimizer", None)
        if optimizer is None:  # no optimizer linked yet: the partition as the module holds it
            return param.ds_tensor.float()
        return optimizer.get_local_fp32_param(param)
    return param.detach().float()


def _slice_of(param: nn.Parameter, placement: Placement) -> Slice:
    if placement == "fragment":
        mapping = param._hp_mapping
        if mapping is None:
            return Slice(0, 0)
        return Slice(mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel)
    if placement == "partition":
        size = param.ds_tensor.numel()
        return Slice(dist.get_rank() * size, size)
    return Slice(0, param.numel())


class EMA:
    """Shadow weights: ema ← decay_t·ema + (1 − decay_t)·θ, with decay_t = min(decay, (1 + n) / (10 + n)),
    θ the fp32 master weights of the trainable parameters."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.names = [name for name, _ in named]
        self.placement = placement_of([p for _, p in named])
        self.shapes = {name: p.ds_shape if hasattr(p, "ds_shape") else p.shape for name, p in named}
        self.slices = {name: _slice_of(p, self.placement) for name, p in named}
        self.sharded = self.placement != "whole" and dist.is_initialized() and dist.get_world_size() > 1
        self.groups = {name: getattr(p, "_dp_group", None) for name, p in named}
        self.shadow = {name: master_part(p, self.placement).detach().clone() for name, p in named}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow weights towards the current master weights (this rank's part of them)."""
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        named = dict(model.named_parameters())
        for name in self.names:
            self.shadow[name].lerp_(master_part(named[name], self.placement), 1 - decay)
        self.updates += 1

    def local_bytes(self) -> int:
        """Bytes this rank's shadow weights take."""
        return sum(t.numel() * t.element_size() for t in self.shadow.values())

    def state_dict(self, only_rank: int | None = None) -> dict[str, torch.Tensor]:
        """The whole shadow weights by parameter name (a model state dict), on CPU when sharded.

        Collective when sharded. With `only_rank`, the other ranks keep nothing and get an empty dict.
        """
        if not self.sharded:
            return {name: self._shaped(name, tensor) for name, tensor in self.shadow.items()}
        assemble = self._gathered if self.placement == "partition" else self._summed
        whole = {}
        for name in self.names:
            tensor = assemble(name)
            if only_rank is None or dist.get_rank() == only_rank:
                whole[name] = self._shaped(name, tensor).cpu()
        return whole

    def _shaped(self, name: str, flat: torch.Tensor) -> torch.Tensor:
        """The first numel(shape) values of `flat` as the parameter's shape (contiguous)."""
        shape = self.shapes[name]
        return flat.flatten()[: math.prod(shape)].reshape(shape).contiguous()

    def _on_comm_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """NCCL collectives need the tensor on this rank's GPU, even for offloaded state."""
        return tensor.to(torch.cuda.current_device()) if dist.get_backend() == "nccl" else tensor

    def _gathered(self, name: str) -> torch.Tensor:
        """ZeRO-3: every rank's equal-sized partition, concatenated (padding included)."""
        part = self._on_comm_device(self.shadow[name])
        pieces = [torch.empty_like(part) for _ in range(dist.get_world_size())]
        dist.all_gather(pieces, part)
        return torch.cat(pieces)

    def _summed(self, name: str) -> torch.Tensor:
        """ZeRO-1/2: each rank writes its piece into zeros of the whole size; the pieces are
        disjoint and cover the parameter, so their sum is the whole, exactly."""
        numel, piece = math.prod(self.shapes[name]), self.slices[name]
        whole = self._on_comm_device(torch.zeros(numel, dtype=torch.float32))
        whole[piece.start : piece.start + piece.numel] = self.shadow[name]
        dist.all_reduce(whole, group=self.groups[name])
        return whole

    def load_state_dict(self, weights: dict[str, torch.Tensor], updates: int) -> None:
        """Restore whole shadow weights saved from `state_dict` (any number of ranks) and the update count."""
        missing = set(self.names) - set(weights)
        if missing:
            raise ValueError(f"EMA weights lack {len(missing)} parameters, e.g. {sorted(missing)[0]}")
        for name in self.names:
            flat, piece = weights[name].float().flatten(), self.slices[name]
            if self.placement == "whole":
                part = flat.view(self.shapes[name])
            else:  # this rank's slice of the flattened parameter (ZeRO-3 partitions are padded)
                padded = torch.cat([flat, flat.new_zeros(max(0, piece.start + piece.numel - flat.numel()))])
                part = padded[piece.start : piece.start + piece.numel]
            self.shadow[name] = part.to(self.shadow[name].device).clone()
        self.updates = updates
