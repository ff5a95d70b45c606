"""Rectified flow (flow matching) between data x0 (t = 0) and noise (t = 1).

x_t = (1 - t)·x0 + t·noise; the network predicts the velocity v = noise - x0.
Shape legend: B batch, C channels, F frames, H height, W width.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

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


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t for per-sample t (B,): (1 - t)·x0 + t·noise."""
    t = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow's velocity d x_t / d t = noise - x0."""
    return noise - x0


def flow_errors(predict: Velocity, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Squared error, element by element (float32, x0's shape), between the predicted and the true
    velocity at (x_t, t)."""
    x_t = interpolate(x0, noise, t)
    v = predict(x_t.to(x0.dtype), t)
    return (v.float() - velocity_target(x0, noise).float()) ** 2


def flow_loss(predict: Velocity, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the predicted and the true velocity at (x_t, t)."""
    return torch.mean(flow_errors(predict, x0, noise, t))
