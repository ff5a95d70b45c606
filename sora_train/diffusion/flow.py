"""Rectified flow (flow matching) between data x0 (t = 0) and noise (t = 1).

x_t = (1 - t)·x0 + t·noise; the network predicts the velocity v = noise - x0.
Shape legend: B batch, C channels, F frames, H height, W width.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch
from einops import rearrange

from .conditioning import hold_frames

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> v


def sample_timesteps(
    batch: int,
    generator: torch.Generator,
    mean: float = 0.0,
    std: float = 1.0,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Logit-normal timesteps in (0, 1): sigmoid(N(mean, std²)), shape (B,)."""
    normal = torch.randn(batch, generator=generator, device=device)
    return torch.sigmoid(mean + std * normal)


def uniform_timesteps(batch: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform timesteps in [0, 1): (B,)."""
    return torch.rand(batch, generator=generator)


def mode_timesteps(batch: int, generator: torch.Generator, scale: float = 1.29) -> torch.Tensor:
    """Timesteps from the mode-sampling density of SD3 (heavier in the middle for scale > 0):
    t = 1 - u - scale·(cos²(π·u/2) - 1 + u), u uniform; (B,)."""
    u = torch.rand(batch, generator=generator)
    return 1 - u - scale * (torch.cos(torch.pi / 2 * u) ** 2 - 1 + u)


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Move timesteps towards noise by `shift` (>= 1): t' = shift·t / (1 + (shift - 1)·t).

    At the same t a longer or larger clip keeps more of its signal (more tokens carry the same
    content), so it needs noisier timesteps to be trained as hard; shift 1 leaves t unchanged.
    """
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(tokens: int, base_tokens: int) -> float:
    """The timestep shift for a sample of `tokens` video tokens: sqrt(tokens / base_tokens), at least 1."""
    return max(1.0, (tokens / base_tokens) ** 0.5)


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) values shaped to broadcast over a (B, ...) tensor `like`: (B, 1, ..., 1)."""
    return values.view(-1, *([1] * (like.dim() - 1)))


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t for per-sample t (B,): (1 - t)·x0 + t·noise."""
    t = per_sample(t, x0)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow's velocity d x_t / d t = noise - x0."""
    return noise - x0


def flow_errors(
    predict: Velocity,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    frame_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Squared error, element by element (float32, x0's shape), between the predicted and the true
    velocity at (x_t, t).

    With `frame_mask` (B, f) bool the masked latent frames of x_t are the clean x0 frames
    (frame conditioning); `predict` must hand the model the same mask.
    """
    x_t = interpolate(x0, noise, t)
    if frame_mask is not None:
        x_t = hold_frames(x_t, x0, frame_mask)
    v = predict(x_t.to(x0.dtype), t)
    return (v.float() - velocity_target(x0, noise).float()) ** 2


def cosmap_weight(t: torch.Tensor) -> torch.Tensor:
    """SD3's cosine-map loss weight for rectified flow: w(t) = 2 / (π·(1 - 2t + 2t²)).

    w is the density over t of SD3's cosmap timestep schedule, so it integrates to 1 over [0, 1]:
    under uniform timesteps the weighted loss keeps the unweighted loss's scale. It is largest at
    t = 1/2 (4/π ≈ 1.27) and smallest at the ends (2/π ≈ 0.64); no further normalisation.
    """
    return 2 / (torch.pi * (1 - 2 * t + 2 * t**2))


# `diffusion.loss_weighting`: none, or SD3's cosine-map weight over t (`cosmap_weight`).
LossWeighting = Literal["none", "cosmap"]
LOSS_WEIGHTINGS: tuple[LossWeighting, ...] = get_args(LossWeighting)


def flow_loss(
    predict: Velocity,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    frame_mask: torch.Tensor | None = None,
    weighting: LossWeighting = "none",
) -> torch.Tensor:
    """Mean squared error between the predicted and the true velocity at (x_t, t).

    `weighting` "cosmap" scales each sample's errors by `cosmap_weight(t)`. With `frame_mask`
    (B, f) bool (x0 is (B, C, f, h, w)) the masked frames are clean conditioning (see
    `flow_errors`) and carry no loss: the mean runs over the other frames' elements only.
    """
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; use {' or '.join(LOSS_WEIGHTINGS)}")
    errors = flow_errors(predict, x0, noise, t, frame_mask)
    if weighting == "cosmap":
        errors = errors * per_sample(cosmap_weight(t.float()), errors)
    if frame_mask is None:
        return torch.mean(errors)
    noisy = rearrange(~frame_mask, "b f -> b 1 f 1 1").expand_as(errors)  # (B, C, f, h, w)
    return errors[noisy].mean()
