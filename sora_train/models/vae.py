"""Latent spaces: how pixels become the tensors the DiT denoises.

Every latent space follows the `LatentSpace` protocol: (B, 3, F, H, W) pixels in [-1, 1] go in,
(B, C, f, h, w) latents come out, and back. `PixelSpace` is the identity (pixels are the
latents) for CPU runs; `WanVAE` wraps a pretrained Wan 2.x video VAE loaded from a local
directory.

Wan latents are normalised per channel, as the Wan pipelines do: `encode` takes the
posterior's mode `z` (deterministic, no sampling) and returns `(z - latents_mean) / latents_std`,
with the two C-vectors from the VAE's config broadcast over (B, ·, f, h, w); `decode` undoes it
(`z = latents * latents_std + latents_mean`) before running the decoder. The DiT therefore sees
roughly unit-variance latents.

Frames: the Wan VAE is causal in time. The first frame is encoded on its own (one latent
frame), and the rest in chunks of 4 frames, each becoming 4 / temporal latent frames. So a valid
clip has F = 1 + 4k frames and f = 1 + (F - 1) // temporal latent frames (for the released
models, temporal = 4: 81 frames -> 21 latent frames). Other frame counts are rejected rather
than silently truncated, which is what the diffusers encoder would do. Heights and widths must
be multiples of the spatial compression.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Protocol, get_args, runtime_checkable

import torch
from einops import rearrange

HF_EXTRA_HINT = "install the optional Hugging Face extra: pip install 'sora-train[hf]'"

# diffusers' Wan encoder takes the first frame alone, then chunks of this many frames
WAN_ENCODER_CHUNK = 4


@runtime_checkable
class LatentSpace(Protocol):
    """What the trainer needs from a latent space.

    Shape legend: B batch, F/H/W pixel frames/height/width, C latent channels,
    f/h/w latent frames/height/width.
    """

    channels: int  # C
    compression: tuple[int, int, int]  # (time, height, width) compression factors

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, F, H, W) float pixels in [-1, 1] -> (B, C, f, h, w) latents."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, f, h, w) latents -> (B, 3, F, H, W) pixels in [-1, 1]."""
        ...

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, f, h, w) of a clip of `frames` x `height` x `width` pixels.

        Raises ValueError (one line) when the clip size is not valid for this space.
        """
        ...


def _check_positive(frames: int, height: int, width: int) -> None:
    """Raise ValueError unless frames, height and width are all >= 1."""
    if min(frames, height, width) < 1:
        raise ValueError(f"frames, height and width must be >= 1, got {frames}x{height}x{width}")


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

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(3, F, H, W): any positive clip size is valid."""
        _check_positive(frames, height, width)
        return (self.channels, frames, height, width)


def _import_diffusers() -> Any:
    """The diffusers module, or an ImportError that says how to install it."""
    try:
        import diffusers
    except ImportError as error:
        raise ImportError(f"the Wan VAE needs diffusers; {HF_EXTRA_HINT}") from error
    return diffusers


class WanVAE:
    """A pretrained diffusers `AutoencoderKLWan`, frozen, loaded from a local directory.

    Args:
        path: directory holding the VAE's `config.json` and weights (as written by
            `save_pretrained`, e.g. the `vae/` folder of a Wan checkpoint). Nothing is downloaded.
        device: where the VAE runs.
        dtype: the VAE's parameter dtype (inputs are cast to it); latents are always float32.
    """

    def __init__(self, path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        diffusers = _import_diffusers()
        self.device = torch.device(device)
        self.dtype = dtype
        vae = diffusers.AutoencoderKLWan.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        config = self.vae.config

        # Compression from the architecture itself: the config's scale_factor_* entries are
        # defaults (4, 8) that do not follow dim_mult / temperal_downsample.
        temporal = 2 ** sum(bool(down) for down in config.temperal_downsample)
        spatial = 2 ** (len(config.dim_mult) - 1) * (config.get("patch_size") or 1)
        if WAN_ENCODER_CHUNK % temporal:
            raise ValueError(
                f"unsupported Wan VAE at {path}: temporal compression {temporal} does not divide the "
                f"encoder's {WAN_ENCODER_CHUNK}-frame chunks (temperal_downsample={config.temperal_downsample})"
            )
        self.channels: int = config.z_dim
        self.compression: tuple[int, int, int] = (temporal, spatial, spatial)

        mean, std = config.latents_mean, config.latents_std
        if len(mean) != self.channels or len(std) != self.channels:
            raise ValueError(
                f"Wan VAE at {path}: latents_mean / latents_std have {len(mean)} / {len(std)} entries "
                f"but z_dim is {self.channels}"
            )
        # (C,) -> (1, C, 1, 1, 1), broadcast over batch, frames, height, width; float32
        self.latents_mean = rearrange(torch.tensor(mean, dtype=torch.float32), "c -> 1 c 1 1 1").to(
            self.device
        )
        self.latents_std = rearrange(torch.tensor(std, dtype=torch.float32), "c -> 1 c 1 1 1").to(self.device)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, f, h, w) with f = 1 + (F - 1) // temporal, h = H // spatial, w = W // spatial.

        Raises ValueError unless F = 1 + 4k and H, W are multiples of the spatial compression.
        """
        _check_positive(frames, height, width)
        temporal, spatial, _ = self.compression
        if (frames - 1) % WAN_ENCODER_CHUNK:
            raise ValueError(
                f"the Wan VAE needs 1 + {WAN_ENCODER_CHUNK}k frames (1, 5, 9, ...), got {frames}"
            )
        if height % spatial or width % spatial:
            raise ValueError(
                f"the Wan VAE needs height and width divisible by {spatial}, got {height}x{width}"
            )
        return (self.channels, 1 + (frames - 1) // temporal, height // spatial, width // spatial)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, F, H, W) pixels in [-1, 1] -> normalised (B, C, f, h, w) float32 latents.

        The latents are returned on the device `pixels` came from.
        """
        if pixels.ndim != 5:
            raise ValueError(f"expected pixels of shape (B, 3, F, H, W), got {tuple(pixels.shape)}")
        self.latent_shape(*pixels.shape[2:])  # validate the clip size
        posterior = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        z = posterior.mode().float()  # (B, C, f, h, w)
        return ((z - self.latents_mean) / self.latents_std).to(pixels.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised (B, C, f, h, w) latents -> (B, 3, 1 + (f - 1) * temporal, H, W) float32 pixels in [-1, 1].

        The pixels are returned on the device `latents` came from.
        """
        if latents.ndim != 5 or latents.shape[1] != self.channels:
            raise ValueError(
                f"expected latents of shape (B, {self.channels}, f, h, w), got {tuple(latents.shape)}"
            )
        z = latents.to(self.device, torch.float32) * self.latents_std + self.latents_mean
        pixels = self.vae.decode(z.to(self.dtype)).sample  # (B, 3, F, H, W)
        return pixels.float().clamp(-1, 1).to(latents.device)


# `model.latent_space`: pixels as they are, or a pretrained Wan VAE's latents.
LatentSpaceName = Literal["pixel", "wan"]
LATENT_SPACES: tuple[LatentSpaceName, ...] = get_args(LatentSpaceName)


def latent_channels(name: LatentSpaceName, path: str | None = None) -> int:
    """Channels of a latent space, read from its config (no weights are loaded)."""
    if name == "pixel":
        return PixelSpace.channels
    if name != "wan":
        raise ValueError(f"unknown latent space {name!r}; choose one of {sorted(LATENT_SPACES)}")
    if path is None:
        raise ValueError("latent space 'wan' needs path= a local directory holding the Wan VAE")
    return int(json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))["z_dim"])


def build_latent_space(
    name: LatentSpaceName,
    path: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LatentSpace:
    """The latent space called `name`: "pixel" (identity) or "wan" (a pretrained Wan VAE at `path`).

    `path`, `device` and `dtype` only matter for pretrained spaces.
    """
    if name == "pixel":
        return PixelSpace()
    if name == "wan":
        if path is None:
            raise ValueError("latent space 'wan' needs path= a local directory holding the Wan VAE")
        return WanVAE(path, device=device, dtype=dtype)
    raise ValueError(f"unknown latent space {name!r}; choose one of {sorted(LATENT_SPACES)}")
