"""The training timesteps of a micro-batch, as the diffusion config asks for them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch

from .flow import mode_timesteps, resolution_shift, sample_timesteps, shift_timesteps, uniform_timesteps

if TYPE_CHECKING:
    from ..config import DiffusionConfig

# `diffusion.timesteps`: logit-normal (logit_mean, logit_std), uniform, or SD3's mode sampling (mode_scale).
TimestepSampling = Literal["logit_normal", "uniform", "mode"]


def training_timesteps(
    batch: int, tokens: int, generator: torch.Generator, diffusion: DiffusionConfig
) -> torch.Tensor:
    """(B,) timesteps for `batch` samples of `tokens` video tokens each: drawn by
    `diffusion.timesteps`, then shifted towards noise for samples longer than
    `diffusion.shift_base_tokens` (when set)."""
    if diffusion.timesteps == "uniform":
        t = uniform_timesteps(batch, generator)
    elif diffusion.timesteps == "mode":
        t = mode_timesteps(batch, generator, diffusion.mode_scale)
    else:
        t = sample_timesteps(batch, generator, diffusion.logit_mean, diffusion.logit_std)
    if diffusion.shift_base_tokens:
        t = shift_timesteps(t, resolution_shift(tokens, diffusion.shift_base_tokens))
    return t
