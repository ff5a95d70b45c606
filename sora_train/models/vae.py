"""Latent spaces: how pixels become the tensors the DiT denoises.

`PixelSpace` is the identity (pixels in [-1, 1] are the latents) for CPU runs; pretrained
video VAEs plug in behind the same interface.
"""

from __future__ import annotations

import torch


class PixelSpace:
    """Identity latent space: 3 channels, no compression in time or space."""

    channels = 3
    compression = (1, 1, 1)  # (time, height, width)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, F, H, W) pixels in [-1, 1] -> latents of the same shape."""
        return pixels

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> (B, 3, F, H, W) pixels in [-1, 1]."""
        return latents.clamp(-1, 1)


LATENT_SPACES = {"pixel": PixelSpace}


def build_latent_space(name: str) -> PixelSpace:
    """The latent space called `name`."""
    if name not in LATENT_SPACES:
        raise ValueError(f"unknown latent space {name!r}; choose one of {sorted(LATENT_SPACES)}")
    return LATENT_SPACES[name]()
