"""Spacetime patches: (B, C, F, H, W) videos <-> (B, L, pt·ph·pw·C) token rows.

Shape legend: B batch, C channels, F frames, H height, W width, L = f·h·w tokens,
(pt, ph, pw) patch size, (f, h, w) = (F/pt, H/ph, W/pw) the token grid.
"""

from __future__ import annotations

import torch
from einops import rearrange


def grid_size(shape: tuple[int, int, int], patch: tuple[int, int, int]) -> tuple[int, int, int]:
    """Token grid (f, h, w) of a (F, H, W) video; raises if a side does not divide by its patch."""
    for side, size, name in zip(shape, patch, "FHW", strict=True):
        if side % size:
            raise ValueError(f"{name}={side} is not divisible by the patch size {size} (patch={patch})")
    return shape[0] // patch[0], shape[1] // patch[1], shape[2] // patch[2]


def patchify(x: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, F, H, W) -> (B, f·h·w, pt·ph·pw·C)."""
    grid_size(tuple(x.shape[2:]), patch)
    pt, ph, pw = patch
    return rearrange(x, "b c (f pt) (h ph) (w pw) -> b (f h w) (pt ph pw c)", pt=pt, ph=ph, pw=pw)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> torch.Tensor:
    """(B, f·h·w, pt·ph·pw·C) -> (B, C, F, H, W); the inverse of `patchify`."""
    f, h, w = grid
    pt, ph, pw = patch
    return rearrange(
        tokens, "b (f h w) (pt ph pw c) -> b c (f pt) (h ph) (w pw)", f=f, h=h, w=w, pt=pt, ph=ph, pw=pw
    )
