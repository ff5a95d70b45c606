"""Euler integration of the flow from noise (t = 1) to data (t = 0), with classifier-free guidance.

The convention is diffusers' FlowMatchEulerDiscreteScheduler as WanPipeline uses it (tested in
tests/test_wan_sampling.py): t is the scheduler's sigma, the model's timestep is 1000·t (inside
the model's time embedding), the velocity is noise - x0, and one step is x + (t_next - t)·v.
A model trained on part of [0, 1] (one of Wan 2.2's experts, see `timesteps.TimestepRange`)
integrates only its part of the schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import torch

from .conditioning import hold_frames
from .flow import interpolate, shift_timesteps
from .timesteps import FULL_RANGE, TimestepRange

ConditionalVelocity = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]  # (x_t, t, conditional) -> v

# diffusers' schedulers discretise training into 1000 timesteps (the model's timestep is 1000·t).
TRAIN_TIMESTEPS = 1000


def sample_times(
    steps: int,
    shift: float | None = None,
    t_range: TimestepRange = FULL_RANGE,
    device: torch.device | None = None,
) -> torch.Tensor:
    """The descending times (float32) the sampler visits, first to last.

    `shift` None: `steps` uniform steps from 1 to 0, (steps + 1,). A shift: diffusers'
    FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(steps) sigmas, (steps + 1,): `steps`
    times evenly spaced from 1 down to the scheduler's smallest training sigma (1/1000 shifted), then
    shifted (so the smallest is shifted twice, as there), then 0. `t_range` other than [0, 1] keeps the
    times strictly inside it and adds its ends: the range's share of the same schedule, from its top
    to its bottom, e.g. [1, ..., boundary] for the high-noise expert, [boundary⁻, ..., 0] for the low
    one, whose open top end is the float32 just below the boundary (every time stays in the range).
    """
    if shift is None:
        times = torch.linspace(1.0, 0.0, steps + 1, device=device)
    else:
        smallest = shift_timesteps(torch.tensor(1.0 / TRAIN_TIMESTEPS, dtype=torch.float64), shift)
        spaced = torch.linspace(1.0, float(smallest), steps, dtype=torch.float64)
        times = torch.cat([shift_timesteps(spaced, shift), torch.zeros(1, dtype=torch.float64)])
        times = times.to(device=device, dtype=torch.float32)
    if t_range.full:
        return times
    top = t_range.clamp(torch.tensor([t_range.high], device=device))  # just below an open top end
    inside = times[(times > t_range.low) & (times < top)]
    return torch.cat([top, inside, torch.tensor([t_range.low], device=device)])


def euler_step(x: torch.Tensor, v: torch.Tensor, t_now: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """One Euler step of dx/dt = v from t_now to t_next (< t_now): x + (t_next - t_now)·v."""
    return x + (t_next - t_now) * v


def guided_velocity(
    velocity: ConditionalVelocity, x: torch.Tensor, t: torch.Tensor, cfg_scale: float
) -> torch.Tensor:
    """The velocity at (x, t) with classifier-free guidance: v_uncond + cfg_scale·(v_cond - v_uncond)
    (one call, the conditional one, when cfg_scale is 1)."""
    v = velocity(x, t, True)
    if cfg_scale != 1.0:
        v_uncond = velocity(x, t, False)
        v = v_uncond + cfg_scale * (v - v_uncond)
    return v


@torch.no_grad()
def euler_sample(
    velocity: ConditionalVelocity,
    noise: torch.Tensor,
    steps: int,
    cfg_scale: float = 1.0,
    clean: torch.Tensor | None = None,
    frame_mask: torch.Tensor | None = None,
    shift: float | None = None,
    t_range: TimestepRange = FULL_RANGE,
    reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integrate dx/dt = v from t = 1 to 0 along `sample_times(steps, shift, t_range)`, Euler steps.

    With cfg_scale != 1 the velocity is v_uncond + cfg_scale·(v_cond - v_uncond).
    With `clean` (noise's shape, (B, C, f, h, w)) and `frame_mask` (B, f) bool, the masked frames
    are held at their clean values before every velocity call and after the last step, so they
    come back unchanged; `velocity` must hand the model the same mask (both branches).

    A range below t = 1 (the low-noise expert, t < boundary) cannot start from pure noise, which it
    never saw: it starts at its top time t_s from the forward process x = (1 - t_s)·reference + t_s·noise.
    `reference` (broadcasts to noise's shape) holds the clean latents of the clips to re-noise (then the
    sample re-details them, SDEdit at strength t_s: the expert's job in the two-expert pipeline); None
    takes 0, the mean of normalised latents (a flat mid-grey clip in pixels), so the sample shows what
    the expert makes of input with no structure, not a text-to-video sample.
    A range above t = 0 (the high-noise expert, t >= boundary) ends at its bottom time t_e and returns
    the clean estimate there, x - t_e·v (guided), not the still noisy x.
    """
    if (clean is None) != (frame_mask is None):
        raise ValueError("frame conditioning needs both the clean latents and the frame mask")
    times = sample_times(steps, shift, t_range, noise.device)
    x = noise
    if times[0] < 1:
        start = torch.zeros_like(noise) if reference is None else reference.expand_as(noise)
        x = interpolate(start, noise, times[:1]).to(noise.dtype)
    x = x if frame_mask is None else hold_frames(x, clean, frame_mask)
    for t_now, t_next in pairwise(times):
        v = guided_velocity(velocity, x, t_now.expand(x.shape[0]), cfg_scale)
        x = euler_step(x, v, t_now, t_next)
        if frame_mask is not None:
            x = hold_frames(x, clean, frame_mask)
    if times[-1] > 0:
        x = x - times[-1] * guided_velocity(velocity, x, times[-1].expand(x.shape[0]), cfg_scale)
        x = x if frame_mask is None else hold_frames(x, clean, frame_mask)
    return x
