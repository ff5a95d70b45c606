"""3D rotary position embedding over the (f, h, w) token grid.

The head dimension K is split into three even parts, one per axis (time, height, width);
each part rotates by its own axis' integer position. Positions are plain integers, so any
grid size works, including grids larger than those seen in training.
Shape legend: B batch, N heads, L = f·h·w tokens, K head dim.
"""

from __future__ import annotations

import torch
from einops import rearrange


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Split an (even) head dim into even (time, height, width) parts; time gets the remainder."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def grid_positions(grid: tuple[int, int, int], device: torch.device | None = None) -> torch.Tensor:
    """Integer (t, y, x) positions of every token of a (f, h, w) grid in patch order: (L, 3)."""
    f, h, w = grid
    axes = [torch.arange(n, device=device) for n in (f, h, w)]
    mesh = torch.meshgrid(*axes, indexing="ij")  # three (f, h, w)
    return rearrange(torch.stack(mesh), "a f h w -> (f h w) a")


def rope_angles(
    positions: torch.Tensor,
    head_dim: int,
    theta: float = 10000.0,
    dims: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Rotation angles for (L, 3) positions: (L, K/2), float32.

    `dims`: the (time, height, width) parts of the head dim, each even, summing to it; None: `axis_dims`.
    """
    dims = dims or axis_dims(head_dim)
    if sum(dims) != head_dim or any(d % 2 for d in dims):
        raise ValueError(f"RoPE axis dims {dims} must be even and sum to the head dim {head_dim}")
    parts = []
    for axis, dim in enumerate(dims):
        if dim == 0:
            continue
        freqs = theta ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
        parts.append(positions[:, axis, None].float() * freqs)  # (L, dim/2)
    return torch.cat(parts, dim=-1)


def sincos_embedding(positions: torch.Tensor, dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Absolute sinusoidal embedding of (L, 3) positions: (L, dim), each axis a third of the dims."""
    parts = []
    for axis, axis_dim in enumerate(axis_dims(dim)):
        freqs = theta ** (
            -torch.arange(0, axis_dim, 2, device=positions.device, dtype=torch.float32) / axis_dim
        )
        angles = positions[:, axis, None].float() * freqs  # (L, axis_dim/2)
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=-1)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate (B, N, L, K) queries or keys by (L, K/2) angles (pairs of adjacent channels)."""
    pairs = rearrange(x.float(), "b n l (k two) -> b n l k two", two=2)
    cos, sin = angles.cos(), angles.sin()  # (L, K/2)
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rearrange(rotated, "b n l k two -> b n l (k two)").type_as(x)
