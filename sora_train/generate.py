"""Prompts in, video frames out: tokenize, integrate the flow with CFG, decode to uint8.

Clips can be conditioned on given pixel frames: frames for the start (an image, or a video's last
frames to extend it) and frames for the end (a last image, for interpolation). They are encoded
as the latent frames they cover whole (see `diffusion/conditioning.py`), which the sampler then
holds clean.

A model trained on part of the timesteps (`diffusion.expert`, `diffusion.t_min`/`t_max`) samples
only its part of the schedule (see `diffusion/sampler.euler_sample`): the high-noise expert returns
its clean estimate at the boundary; the low-noise expert starts at the boundary from a reference
clip re-noised there.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from einops import rearrange, repeat

from .config import DiffusionConfig, ModelConfig
from .data.decode import to_unit_range
from .diffusion.conditioning import cover_given_frames
from .diffusion.sampler import euler_sample
from .diffusion.timesteps import timestep_range
from .models.denoiser import VideoDenoiser
from .models.prompts import PromptEncoder
from .models.vae import LatentSpace, build_latent_space
from .video_io import write_mp4


def fill_clip(head: np.ndarray, tail: np.ndarray, frames: int) -> np.ndarray:
    """(F, H, W, 3): `head` (P, H, W, 3) at the start, `tail` (Q, H, W, 3) at the end, and every
    frame between them a copy of the nearer given frame."""
    h, q = len(head), len(tail)
    gap = frames - h - q
    fill = [h - 1 if h and (not q or 2 * i < gap) else h for i in range(gap)]  # index into head ++ tail
    return np.concatenate([head, tail])[[*range(h), *fill, *range(h, h + q)]]


def conditioning_latents(
    latent_space: LatentSpace,
    shape: tuple[int, int, int],
    first_frames: np.ndarray | None,
    last_frames: np.ndarray | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean latents (1, C, f, h, w) and the frame mask (f,) bool for a clip of (F, H, W) pixels
    that starts with `first_frames` and/or ends with `last_frames`, each (P, H, W, 3) uint8.

    Only the latent frames the given frames cover whole are conditioned: of the first frames, the
    last 1 + temporal·(k - 1) become the clip's first frames (k latent frames); of the last frames,
    the last temporal·j become its last frames (j latent frames). The others are dropped, so a
    clip that extends a video continues from the video's final frame. Fewer last frames than one
    latent frame holds (one last image under 4× time compression) are padded by repeating the
    first of them: the clip ends holding still on them. The clip is encoded whole, the gap filled
    with copies of the nearer given frame: with a causal VAE the start latents are then exactly
    what training sees; the end latents see the filled frames as their past. Raises ValueError
    (one line) for frames of the wrong size, or frames covering no or every latent frame.
    """
    frames, height, width = shape
    empty = np.zeros((0, height, width, 3), np.uint8)
    first = empty if first_frames is None else first_frames
    last = empty if last_frames is None else last_frames
    for given in (first, last):
        if given.dtype != np.uint8 or given.shape[1:] != (height, width, 3):
            raise ValueError(
                f"conditioning frames must be uint8 (P, {height}, {width}, 3), got {given.dtype} {given.shape}"
            )
    temporal = latent_space.compression[0]
    if 0 < len(last) < temporal:  # too few to fill the last latent frame: the clip ends holding still on them
        last = np.concatenate([np.repeat(last[:1], temporal - len(last), axis=0), last])
    cover = cover_given_frames(len(first), len(last), frames, temporal)
    head = first[len(first) - cover.head_pixels :]
    tail = last[len(last) - cover.tail_pixels :]
    clip = torch.from_numpy(fill_clip(head, tail, frames))
    pixels = to_unit_range(rearrange(clip, "f h w c -> 1 c f h w"))  # (1, 3, F, H, W) in [-1, 1]
    return latent_space.encode(pixels).float(), cover.mask()


@torch.no_grad()
def generate_videos(
    model: VideoDenoiser,
    model_cfg: ModelConfig,
    prompts: list[str],
    shape: tuple[int, int, int],
    diffusion: DiffusionConfig,
    seed: int | Sequence[int] = 0,
    first_frames: np.ndarray | None = None,
    last_frames: np.ndarray | None = None,
    reference: torch.Tensor | None = None,
) -> np.ndarray:
    """Sample one clip per prompt at (F, H, W) pixels: (B, F, H, W, 3) uint8 frames.

    Noise comes from a generator seeded with `seed`, so the same seed gives the same clips; with one
    seed per prompt, each clip's noise comes from its own seed (see `initial_noise`).
    The unconditional branch of classifier-free guidance uses the empty caption.
    `first_frames` / `last_frames` ((P, H, W, 3) uint8) condition every clip on its start / end
    (see `conditioning_latents`); the model must have been built with frame_conditioning.

    The schedule has `diffusion.sample_steps` steps, shifted by `diffusion.sample_shift`, and keeps
    to `timestep_range(diffusion)`. A range that starts below t = 1 (the low-noise expert) starts from
    `reference` ((1 or B, C, f, h, w) clean latents, e.g. held-out clips) re-noised to its top time
    with the seeded noise; without one, from the given frames' clip (`conditioning_latents`, the gap
    filled with copies of them) when frames are given, else from zero latents (see `euler_sample`).
    """
    latent_space = build_latent_space(model_cfg.latent_space, model_cfg.vae_path)
    encoder = PromptEncoder(model_cfg)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype

    def on_device(x: torch.Tensor) -> torch.Tensor:
        return x.to(device, dtype) if x.is_floating_point() else x.to(device)

    ids, mask = (on_device(x) for x in encoder(prompts))
    null_ids, null_mask = (on_device(x) for x in encoder([""] * len(prompts)))
    clean = frame_mask = None  # (B, C, f, h, w) latents and (B, f) bool, when conditioned
    if first_frames is not None or last_frames is not None:
        if not model_cfg.frame_conditioning:
            raise ValueError("this model was not built with frame_conditioning; it cannot take given frames")
        latents, frames = conditioning_latents(latent_space, shape, first_frames, last_frames)
        clean = repeat(latents, "1 c f h w -> b c f h w", b=len(prompts)).to(device, dtype)
        frame_mask = repeat(frames, "f -> b f", b=len(prompts)).to(device)

    def velocity(x: torch.Tensor, t: torch.Tensor, conditional: bool) -> torch.Tensor:
        text, text_mask = (ids, mask) if conditional else (null_ids, null_mask)
        return model(x, t, text, text_mask, frame_mask)  # t stays float32 (the models embed it so)

    latent_shape = (len(prompts), *latent_space.latent_shape(*shape))  # (B, C, f, h, w)
    noise = initial_noise(latent_shape, seed).to(device=device, dtype=dtype)
    reference = clean if reference is None else reference.to(device, dtype)  # clean: the given frames' clip
    latents = euler_sample(
        velocity, noise, diffusion.sample_steps, diffusion.cfg_scale, clean, frame_mask,
        diffusion.sample_shift, timestep_range(diffusion), reference,
    )  # fmt: skip
    pixels = latent_space.decode(latents.float())  # (B, 3, F, H, W) in [-1, 1]
    video = ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return rearrange(video, "b c f h w -> b f h w c").cpu().numpy()


def initial_noise(shape: tuple[int, ...], seed: int | Sequence[int]) -> torch.Tensor:
    """Standard normal float32 noise of `shape` ((B, ...)): from one generator seeded with `seed`, or,
    given B seeds, item i from a generator of its own seeded with `seed[i]`, so that it does not
    depend on the batch it is drawn in (item i equals a batch of one drawn with `seed[i]`)."""
    if isinstance(seed, int):
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if len(seed) != shape[0]:
        raise ValueError(f"{len(seed)} seeds for a batch of {shape[0]}")
    return torch.stack([torch.randn(shape[1:], generator=torch.Generator().manual_seed(s)) for s in seed])


def prompt_slug(prompt: str, limit: int = 60) -> str:
    """A file-name-safe short form of a prompt."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:limit] or "empty"


def save_clips(clips: np.ndarray, prompts: list[str], out_dir: Path, fps: float) -> list[Path]:
    """Write each (F, H, W, 3) clip to out_dir/NN_prompt.mp4."""
    return [
        write_mp4(out_dir / f"{index:02d}_{prompt_slug(prompt)}.mp4", clip, fps)
        for index, (prompt, clip) in enumerate(zip(prompts, clips, strict=True))
    ]
