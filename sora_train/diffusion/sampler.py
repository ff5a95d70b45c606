"""Euler integration of the flow from noise (t = 1) to data (t = 0), with classifier-free guidance."""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import torch

ConditionalVelocity = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]  # (x_t, t, conditional) -> v


@torch.no_grad()
def euler_sample(
    velocity: ConditionalVelocity, noise: torch.Tensor, steps: int, cfg_scale: float = 1.0
) -> torch.Tensor:
    """Integrate dx/dt = v from t = 1 to 0 in `steps` uniform Euler steps.

    With cfg_scale != 1 the velocity is v_uncond + cfg_scale·(v_cond - v_uncond).
    """
    x = noise
    times = torch.linspace(1.0, 0.0, steps + 1, device=noise.device)
    for t_now, t_next in pairwise(times):
        t = t_now.expand(x.shape[0])
        v = velocity(x, t, True)
        if cfg_scale != 1.0:
            v_uncond = velocity(x, t, False)
            v = v_uncond + cfg_scale * (v - v_uncond)
        x = x + (t_next - t_now) * v
    return x
