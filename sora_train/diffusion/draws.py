"""A training sample's randomness, drawn from (seed, sample key, step) alone.

Each sample of a step gets its own generator, seeded by a hash of the run's seed, the sample's key
and the optimizer step, and draws from it in a fixed order: caption dropout, timestep, noise, then
(with frame conditioning) the conditioning strategy and its frames. No draw depends on the rank,
the micro-batch a sample lands in or what other samples drew, so a step's loss is the same for any
layout of the same global batch (data parallel × sequence parallel × accumulation, any number of
ranks, before and after an elastic resume), and a resume needs no saved generator state.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .conditioning import draw_frame_mask
from .timesteps import training_timesteps

if TYPE_CHECKING:
    from ..config import DiffusionConfig


def sample_generator(seed: int, key: str, step: int) -> torch.Generator:
    """A CPU generator seeded by (seed, key, step): the same on every rank, for any batch layout."""
    digest = hashlib.blake2b(f"{seed}\x00{step}\x00{key}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)  # < 2**63


@dataclass(frozen=True)
class TrainingDraws:
    """What a micro-batch of B samples draws, on the CPU: caption dropout, timesteps, noise, frames kept clean."""

    dropped: torch.Tensor  # (B,) bool: caption replaced by the empty one
    t: torch.Tensor  # (B,) float32
    noise: torch.Tensor  # (B, C, f, h, w) float32
    frame_mask: torch.Tensor | None  # (B, f) bool, None without frame conditioning


def draw_for_samples(
    keys: list[str], step: int, seed: int, shape: torch.Size, tokens: int, caption_dropout: float,
    diffusion: DiffusionConfig,
) -> TrainingDraws:  # fmt: skip
    """The draws of the samples `keys` at optimizer `step` for latents of `shape` (B, C, f, h, w)
    with `tokens` video tokens each; each sample's come from `sample_generator(seed, key, step)`."""
    conditioned = diffusion.conditions_frames()
    dropped, t, noise, masks = [], [], [], []
    for key in keys:
        generator = sample_generator(seed, key, step)
        dropped.append(torch.rand(1, generator=generator) < caption_dropout)
        t.append(training_timesteps(1, tokens, generator, diffusion))
        noise.append(torch.randn(shape[1:], generator=generator))
        if conditioned:
            masks.append(draw_frame_mask(1, shape[2], diffusion, generator))
    return TrainingDraws(
        dropped=torch.cat(dropped),
        t=torch.cat(t),
        noise=torch.stack(noise),
        frame_mask=torch.cat(masks) if conditioned else None,
    )
