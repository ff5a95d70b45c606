"""Euler integration of the flow from noise (t = 1) to data (t = 0), with classifier-free guidance."""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import torch

from .conditioning import hold_frames

ConditionalVelocity = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]  # (x_t, t, conditional) -> v


@torch.no_grad()
def euler_sample(
    velocity: ConditionalVelocity,
    noise: torch.Tensor,
    steps: int,
    cfg_scale: float = 1.0,
    clean: torch.Tensor | None = None,
    frame_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integrate dx/dt = v from t = 1 to 0 in `steps` uniform Euler steps.

    With cfg_scale != 1 the velocity is v_uncond + cfg_scale·(v_cond - v_uncond).
    With `clean` (noise's shape, (B, C, f, h, w)) and `frame_mask` (B, f) bool, the masked frames
    are held at their clean values before every velocity call and after the last step, so they
    come back unchanged; `velocity` must hand the model the same mask (both branches).
    """
    if (clean is None) != (frame_mask is None):
        raise ValueError("frame conditioning needs both the clean latents and the frame mask")
    x = noise if frame_mask is None else hold_frames(noise, clean, frame_mask)
    times = torch.linspace(1.0, 0.0, steps + 1, device=noise.device)
    for t_now, t_next in pairwise(times):
        t = t_now.expand(x.shape[0])
        v = velocity(x, t, True)
        if cfg_scale != 1.0:
            v_uncond = velocity(x, t, False)
            v = v_uncond + cfg_scale * (v - v_uncond)
        x = x + (t_next - t_now) * v
        if frame_mask is not None:
            x = hold_frames(x, clean, frame_mask)
    return x
