"""The training timesteps of a micro-batch, as the diffusion config asks for them, and the range of
timesteps a model trains on (all of [0, 1], or one of Wan 2.2's two experts).

t is the timestep the model sees, after any shift: 1 is pure noise, 0 the data (see `flow.py`).
Range bounds compare in the timesteps' own dtype (float32), as torch compares a tensor with a
Python float.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from .flow import mode_timesteps, resolution_shift, sample_timesteps, shift_timesteps, uniform_timesteps

if TYPE_CHECKING:
    from ..config import DiffusionConfig

# `diffusion.timesteps`: logit-normal (logit_mean, logit_std), uniform, or SD3's mode sampling (mode_scale).
TimestepSampling = Literal["logit_normal", "uniform", "mode"]

# `diffusion.expert`: train all timesteps, or one of Wan 2.2 A14B's experts: high_noise t in
# [expert_boundary, 1], low_noise t in [0, expert_boundary).
Expert = Literal["none", "high_noise", "low_noise"]

# The mode density's map u -> t is monotone (a restricted range can be inverted) for scales in here.
MODE_SCALE_MONOTONE = (-1.0, 1.0 / (math.pi / 2 - 1))


@dataclass(frozen=True)
class TimestepRange:
    """Timesteps low <= t <= high, or low <= t < high with `open_high` (the low-noise expert)."""

    low: float = 0.0
    high: float = 1.0
    open_high: bool = False

    @property
    def full(self) -> bool:
        """Whether the range is all of [0, 1] (nothing is restricted)."""
        return self.low == 0.0 and self.high == 1.0 and not self.open_high

    def contains(self, t: float) -> bool:
        """Whether the timestep `t` lies in the range."""
        return self.low <= t and (t < self.high if self.open_high else t <= self.high)

    def clamp(self, t: torch.Tensor) -> torch.Tensor:
        """`t` moved into the range (in t's dtype): an open upper end becomes the value just below it."""
        t = t.clamp(self.low, self.high)
        if self.open_high:
            top = torch.tensor(self.high, dtype=t.dtype, device=t.device)
            t = torch.where(t >= top, torch.nextafter(top, torch.zeros_like(top)), t)
        return t


FULL_RANGE = TimestepRange()


def timestep_range(diffusion: DiffusionConfig) -> TimestepRange:
    """The range `diffusion.expert` asks for, or [t_min, t_max] without an expert."""
    if diffusion.expert == "high_noise":
        return TimestepRange(diffusion.expert_boundary, 1.0)
    if diffusion.expert == "low_noise":
        return TimestepRange(0.0, diffusion.expert_boundary, open_high=True)
    return TimestepRange(diffusion.t_min, diffusion.t_max)


def training_timesteps(
    batch: int, tokens: int, generator: torch.Generator, diffusion: DiffusionConfig
) -> torch.Tensor:
    """(B,) timesteps for `batch` samples of `tokens` video tokens each: drawn by
    `diffusion.timesteps`, then shifted towards noise for samples longer than
    `diffusion.shift_base_tokens` (when set), then kept to `timestep_range(diffusion)`.

    A restricted range draws from the conditional distribution (`restricted_timesteps`) with the
    same generator draws as the full range; the full range draws exactly what it always did.
    """
    t_range = timestep_range(diffusion)
    if not t_range.full:
        shift = resolution_shift(tokens, diffusion.shift_base_tokens) if diffusion.shift_base_tokens else 1.0
        return restricted_timesteps(batch, generator, diffusion, t_range, shift)
    if diffusion.timesteps == "uniform":
        t = uniform_timesteps(batch, generator)
    elif diffusion.timesteps == "mode":
        t = mode_timesteps(batch, generator, diffusion.mode_scale)
    else:
        t = sample_timesteps(batch, generator, diffusion.logit_mean, diffusion.logit_std)
    if diffusion.shift_base_tokens:
        t = shift_timesteps(t, resolution_shift(tokens, diffusion.shift_base_tokens))
    return t


def restricted_timesteps(
    batch: int, generator: torch.Generator, diffusion: DiffusionConfig, t_range: TimestepRange, shift: float
) -> torch.Tensor:
    """(B,) float32 timesteps from the configured distribution, shifted by `shift`, conditioned on
    `t_range`: inside the range the density keeps its shape, scaled up to integrate to 1.

    By the inverse CDF: each sample's draw (the same one draw of the generator the unrestricted
    sampler makes, so the random stream and exact resume are unaffected) gives its quantile q in
    (0, 1) under the unshifted distribution F; q moves linearly into [F(a), F(b)], where a and b
    are the range's ends with the shift undone, and t = shift(F⁻¹(q)). Computed in float64.
    """
    quantile = _draw_quantiles(batch, generator, diffusion)
    a, b = (_unshift(end, shift) for end in (t_range.low, t_range.high))
    low, high = (_cdf(torch.tensor([end], dtype=torch.float64), diffusion) for end in (a, b))
    t = _quantile_function(low + (high - low) * quantile, diffusion)
    return t_range.clamp(shift_timesteps(t, shift).float())


def _draw_quantiles(batch: int, generator: torch.Generator, diffusion: DiffusionConfig) -> torch.Tensor:
    """(B,) float64 quantiles under the unshifted distribution, from the sampler's own draws:
    Φ(z) of the logit-normal's normal draw, u of the uniform, 1 - u of the (decreasing) mode map."""
    if diffusion.timesteps == "logit_normal":
        return torch.special.ndtr(torch.randn(batch, generator=generator).double())
    u = torch.rand(batch, generator=generator).double()
    return u if diffusion.timesteps == "uniform" else 1 - u


def _quantile_function(q: torch.Tensor, diffusion: DiffusionConfig) -> torch.Tensor:
    """F⁻¹(q): the unshifted timestep at quantile q (float64)."""
    if diffusion.timesteps == "logit_normal":
        return torch.sigmoid(diffusion.logit_mean + diffusion.logit_std * torch.special.ndtri(q))
    if diffusion.timesteps == "uniform":
        return q
    return _mode_map(1 - q, diffusion.mode_scale)


def _cdf(t: torch.Tensor, diffusion: DiffusionConfig) -> torch.Tensor:
    """F(t): the probability of an unshifted timestep <= t (float64)."""
    if diffusion.timesteps == "logit_normal":
        return torch.special.ndtr((torch.special.logit(t) - diffusion.logit_mean) / diffusion.logit_std)
    if diffusion.timesteps == "uniform":
        return t
    return 1 - _mode_map_inverse(t, diffusion.mode_scale)


def _mode_map(u: torch.Tensor, scale: float) -> torch.Tensor:
    """SD3's mode map u -> t (as `flow.mode_timesteps`), decreasing from t(0) = 1 to t(1) = 0."""
    return 1 - u - scale * (torch.cos(torch.pi / 2 * u) ** 2 - 1 + u)


def _mode_map_inverse(t: torch.Tensor, scale: float) -> torch.Tensor:
    """The u in [0, 1] with `_mode_map(u) = t`, by 80 bisection steps (float64, deterministic)."""
    lo, hi = MODE_SCALE_MONOTONE
    if not lo < scale < hi:
        raise ValueError(f"mode_scale={scale} is outside ({lo}, {hi:.4f}): the mode map is not monotone")
    left, right = torch.zeros_like(t), torch.ones_like(t)
    for _ in range(80):
        middle = (left + right) / 2
        above = _mode_map(middle, scale) > t  # t decreases in u: the root lies right of middle
        left, right = torch.where(above, middle, left), torch.where(above, right, middle)
    return (left + right) / 2


def _unshift(t: float, shift: float) -> float:
    """The timestep that `shift_timesteps(·, shift)` moves to `t`: t / (shift - (shift - 1)·t)."""
    return t / (shift - (shift - 1) * t)
