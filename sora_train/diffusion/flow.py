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
