"""Prompts in, video frames out: tokenize, integrate the flow with CFG, decode to uint8."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from .config import DiffusionConfig, ModelConfig
from .diffusion.sampler import euler_sample
from .models.denoiser import VideoDenoiser
from .models.prompts import PromptEncoder
from .models.vae import build_latent_space
from .video_io import write_mp4


@torch.no_grad()
def generate_videos(
    model: VideoDenoiser,
    model_cfg: ModelConfig,
    prompts: list[str],
    shape: tuple[int, int, int],
    diffusion: DiffusionConfig,
    seed: int = 0,
) -> np.ndarray:
    """Sample one clip per prompt at (F, H, W) pixels: (B, F, H, W, 3) uint8 frames.

    Noise comes from a generator seeded with `seed`, so the same seed gives the same clips.
    The unconditional branch of classifier-free guidance uses the empty caption.
    """
    latent_space = build_latent_space(model_cfg.latent_space, model_cfg.vae_path)
    encoder = PromptEncoder(model_cfg)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype

    def on_device(x: torch.Tensor) -> torch.Tensor:
        return x.to(device, dtype) if x.is_floating_point() else x.to(device)

    ids, mask = (on_device(x) for x in encoder(prompts))
    null_ids, null_mask = (on_device(x) for x in encoder([""] * len(prompts)))

    def velocity(x: torch.Tensor, t: torch.Tensor, conditional: bool) -> torch.Tensor:
        return model(x, t.to(dtype), ids if conditional else null_ids, mask if conditional else null_mask)

    latent_shape = (len(prompts), *latent_space.latent_shape(*shape))  # (B, C, f, h, w)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(latent_shape, generator=generator).to(device=device, dtype=dtype)
    latents = euler_sample(velocity, noise, diffusion.sample_steps, diffusion.cfg_scale)
    pixels = latent_space.decode(latents.float())  # (B, 3, F, H, W) in [-1, 1]
    video = ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return rearrange(video, "b c f h w -> b f h w c").cpu().numpy()


def prompt_slug(prompt: str, limit: int = 60) -> str:
    """A file-name-safe short form of a prompt."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:limit] or "empty"


def save_clips(clips: np.ndarray, prompts: list[str], out_dir: Path, fps: float) -> list[Path]:
    """Write each (F, H, W, 3) clip to out_dir/NN_prompt.mp4."""
    return [
        write_mp4(out_dir / f"{index:02d}_{prompt_slug(prompt)}.mp4", clip, fps)
        for index, (prompt, clip) in enumerate(zip(prompts, clips, strict=True))
    ]
