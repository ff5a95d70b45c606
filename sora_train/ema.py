"""An exponential moving average of the model's weights, kept in fp32.

Under ZeRO-3 each rank holds only a shard of every parameter, so the update gathers
parameters first; with ZeRO-1/2 every rank holds them whole and the update is local.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def _gathered(params: list[nn.Parameter]):
    """Full parameters for reading, under ZeRO-3; a no-op otherwise."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


class EMA:
    """Shadow weights: ema ← decay_t·ema + (1 − decay_t)·θ, with decay_t = min(decay, (1 + n) / (10 + n))."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in model.named_parameters() if p.requires_grad]
        with _gathered(params):
            self.shadow = {
                name: p.detach().float().clone() for name, p in zip(self.names, params, strict=True)
            }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow weights towards the model's current weights."""
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        named = dict(model.named_parameters())
        params = [named[name] for name in self.names]
        with _gathered(params):
            for name, p in zip(self.names, params, strict=True):
                self.shadow[name].lerp_(p.detach().float(), 1 - decay)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow weights by parameter name (a model state dict)."""
        return {name: tensor.contiguous() for name, tensor in self.shadow.items()}

    def load_state_dict(self, weights: dict[str, torch.Tensor], updates: int) -> None:
        """Restore shadow weights saved by `state_dict` and the update count."""
        missing = set(self.names) - set(weights)
        if missing:
            raise ValueError(f"EMA weights lack {len(missing)} parameters, e.g. {sorted(missing)[0]}")
        self.shadow = {name: weights[name].float().clone() for name in self.names}
        self.updates = updates
