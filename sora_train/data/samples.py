"""One planned sample -> one training example, in a decode worker.

The work function reads the sample's byte range from its shard, splits it into members, and
produces the bucket-shaped example: a video clip (decode, aspect-preserving resize, centre crop),
an image (a 1-frame clip), or a precomputed latent. What cannot be used comes back as a
`Skipped` value with the reason; nothing is zero-filled or padded.
Shape legend: C channels, F frames, H height, W width; latents (C, f, h, w).
"""

from __future__ import annotations

import io
import tarfile
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from webdataset.tariterators import base_plus_ext

from .decode import ClipSpec, SkipSample, clip_stride, decode_frames, fit_frames
from .index import IMAGE_EXTENSIONS, LATENT_MEMBER, VIDEO_EXTENSIONS
from .shards import load_npy, read_metadata
from .storage import read_range


@dataclass(frozen=True)
class SampleTask:
    """Where one planned sample is and what shape it must come out as."""

    location: str
    start: int
    length: int
    frames: int
    height: int
    width: int
    latent_shape: tuple[int, int, int, int] | None  # (C, f, h, w) for latent shards, else None
    epoch: int


@dataclass(frozen=True)
class SampleSettings:
    """What every sample of a run shares."""

    seed: int
    stride: int
    target_fps: float | None = None
    window: str = "random"  # random | center


@dataclass(frozen=True)
class Example:
    """A decoded sample: x is (C, F, H, W) uint8 pixels or (C, f, h, w) float32 latents."""

    key: str
    caption: str
    x: torch.Tensor
    text: tuple[torch.Tensor, torch.Tensor] | None = None  # precomputed (T, E) embedding and (T,) mask


@dataclass(frozen=True)
class Skipped:
    """A sample that could not be used, and why."""

    key: str
    reason: str
    detail: str = ""


def split_members(data: bytes) -> tuple[str, dict[str, bytes]]:
    """(key, {extension: bytes}) of one sample's tar members; raises SkipSample(corrupt_sample)."""
    members: dict[str, bytes] = {}
    key = None
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                prefix, extension = base_plus_ext(info.name)
                if key is not None and prefix != key:
                    raise SkipSample("corrupt_sample", f"members of {key} and {prefix} in one range")
                key = prefix
                members[extension.lower()] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError) as error:
        raise SkipSample("corrupt_sample", str(error)) from error
    if key is None:
        raise SkipSample("corrupt_sample", "no member in the sample's byte range")
    return key, members


def caption_of(members: dict[str, bytes]) -> tuple[dict, str]:
    """(metadata, caption) from the json member, or the txt member for the caption."""
    meta: dict = {}
    if "json" in members:
        try:
            meta = read_metadata({"json": members["json"]})
        except (ValueError, UnicodeDecodeError) as error:
            raise SkipSample("bad_metadata", str(error)) from error
    caption = meta.get("caption")
    if not (isinstance(caption, str) and caption.strip()):
        caption = members.get("txt", b"").decode("utf-8", errors="replace").strip()
    if not caption:
        raise SkipSample("missing_caption")
    return meta, caption


def load_example(settings: SampleSettings, task: SampleTask) -> Example | Skipped:
    """Read and decode one sample (the decode workers' function); never raises for bad data."""
    key = f"@{task.start}"
    try:
        key, members = split_members(read_range(task.location, task.start, task.length))
        meta, caption = caption_of(members)
        if task.latent_shape is not None:
            return Example(key, caption, latent_of(members, task.latent_shape), text_of(members))
        rng = np.random.default_rng([settings.seed, task.epoch, zlib.crc32(key.encode())])
        video = next((members[e] for e in VIDEO_EXTENSIONS if e in members), None)
        if video is not None:
            return Example(key, caption, video_clip(video, meta, settings, task, rng))
        image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
        if image is None:
            raise SkipSample("missing_video")
        return Example(key, caption, image_clip(image, task))
    except SkipSample as skip:
        return Skipped(key, skip.reason, str(skip))
    except OSError as error:
        return Skipped(key, "read_error", str(error))


def video_clip(
    data: bytes, meta: dict, settings: SampleSettings, task: SampleTask, rng: np.random.Generator
) -> torch.Tensor:
    """(3, F, H, W) uint8 clip of the bucket's shape from a video's bytes."""
    stride = clip_stride(float(meta.get("fps") or 0.0), settings.target_fps, settings.stride)
    spec = ClipSpec(task.frames, stride, task.height, task.width, settings.window)
    known = meta.get("num_frames")
    frames = decode_frames(data, spec, rng, meta.get("frame_window"), int(known) if known else None)
    return fit_frames(frames, task.height, task.width)


def image_clip(data: bytes, task: SampleTask) -> torch.Tensor:
    """(3, 1, H, W) uint8 clip from an image's bytes (EXIF orientation applied)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except Exception as error:
        raise SkipSample("decode_error", f"image: {error}") from error
    return fit_frames(pixels[None], task.height, task.width)


def latent_of(members: dict[str, bytes], shape: tuple[int, int, int, int]) -> torch.Tensor:
    """A precomputed (C, f, h, w) latent as float32; raises SkipSample for a missing or other-shaped one."""
    if LATENT_MEMBER not in members:
        raise SkipSample("missing_latent")
    try:
        latent = load_npy(members[LATENT_MEMBER])
    except ValueError as error:
        raise SkipSample("bad_latent", str(error)) from error
    if tuple(latent.shape) != shape:
        raise SkipSample("bad_latent", f"latent {latent.shape} != {shape} of its bucket")
    if not np.isfinite(latent).all():
        raise SkipSample("bad_latent", "non-finite values")
    return torch.from_numpy(latent.astype(np.float32))


def text_of(members: dict[str, bytes]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Precomputed caption embedding (T, E) and mask (T,), when the shard has them."""
    if "text.npy" not in members:
        return None
    try:
        text = load_npy(members["text.npy"]).astype(np.float32)
        mask = load_npy(members["text_mask.npy"]).astype(bool)
    except (KeyError, ValueError) as error:
        raise SkipSample("bad_text_embedding", str(error)) from error
    if text.ndim != 2 or mask.shape != text.shape[:1] or not mask.any():
        raise SkipSample("bad_text_embedding", f"text {text.shape}, mask {mask.shape}")
    return torch.from_numpy(text), torch.from_numpy(mask)
