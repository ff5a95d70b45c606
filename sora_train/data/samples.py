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
from .metadata import video_fields
from .shards import load_npy, read_captioned
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
    decoder: str = "auto"  # the loader resolves `data.decoder` once, so every worker decodes alike


@dataclass(frozen=True)
class Example:
    """A decoded sample: x is (C, F, H, W) uint8 pixels or (C, f, h, w) latents as stored.

    NumPy arrays, not tensors: they cross from a decode worker by pickling, which is several times
    cheaper than torch's shared-memory hand-over for arrays this size.
    """

    key: str
    caption: str
    x: np.ndarray
    text: tuple[np.ndarray, np.ndarray] | None = None  # precomputed (T, E) embedding and (T,) mask


@dataclass(frozen=True)
class Skipped:
    """A sample that could not be used, and why."""

    key: str
    reason: str
    detail: str = ""


def split_members(data: bytes) -> tuple[str, dict[str, bytes]]:
    """(key, {extension: bytes}) of one sample's tar members; raises SkipSample(corrupt_sample).

    Reads the ustar headers directly (the shard index has already walked them with `tarfile`);
    GNU long names are followed, and anything more unusual goes through `tarfile`.
    """
    members: dict[str, bytes] = {}
    key, offset, long_name = None, 0, None
    while offset + tarfile.BLOCKSIZE <= len(data):
        header = data[offset : offset + tarfile.BLOCKSIZE]
        if not header.strip(b"\0"):
            break
        try:
            size = tarfile.nti(header[124:136])
        except tarfile.InvalidHeaderError as error:
            raise SkipSample("corrupt_sample", str(error)) from error
        kind, start = header[156:157], offset + tarfile.BLOCKSIZE
        body = data[start : start + size]
        offset = start + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        if len(body) != size:
            raise SkipSample("corrupt_sample", "a member ends after the sample's byte range")
        if kind == tarfile.GNUTYPE_LONGNAME:
            long_name = body.rstrip(b"\0").decode("utf-8", errors="replace")
            continue
        if kind in (tarfile.XHDTYPE, tarfile.XGLTYPE):
            return _split_with_tarfile(data)
        name = long_name or _ustar_name(header)
        long_name = None
        if kind not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            continue
        prefix, extension = base_plus_ext(name)
        if prefix is None:
            continue
        if key is not None and prefix != key:
            raise SkipSample("corrupt_sample", f"members of {key} and {prefix} in one range")
        key, members[extension.lower()] = prefix, body
    if key is None:
        raise SkipSample("corrupt_sample", "no member in the sample's byte range")
    return key, members


def _ustar_name(header: bytes) -> str:
    name = header[0:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
    return (prefix + b"/" + name if prefix else name).decode("utf-8", errors="replace")


def _split_with_tarfile(data: bytes) -> tuple[str, dict[str, bytes]]:
    members: dict[str, bytes] = {}
    key = None
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for info in tar:
                prefix, extension = base_plus_ext(info.name)
                if not info.isreg() or prefix is None:
                    continue
                if key is not None and prefix != key:
                    raise SkipSample("corrupt_sample", f"members of {key} and {prefix} in one range")
                key, members[extension.lower()] = prefix, tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError) as error:
        raise SkipSample("corrupt_sample", str(error)) from error
    if key is None:
        raise SkipSample("corrupt_sample", "no member in the sample's byte range")
    return key, members


def single_threaded() -> None:
    """Decode workers run one torch thread each, so N workers and the trainer share the cores."""
    torch.set_num_threads(1)


def load_example(settings: SampleSettings, task: SampleTask) -> Example | Skipped:
    """Read and decode one sample (the decode workers' function); never raises for bad data."""
    key = f"@{task.start}"
    try:
        key, members = split_members(read_range(task.location, task.start, task.length))
        meta, caption = read_captioned(members)
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
) -> np.ndarray:
    """(3, F, H, W) uint8 clip of the bucket's shape from a video's bytes."""
    fields = video_fields(meta)  # checked as at index time: bad values are a bad_metadata skip
    stride = clip_stride(fields.fps, settings.target_fps, settings.stride)
    spec = ClipSpec(task.frames, stride, task.height, task.width, settings.window)
    frames = decode_frames(data, spec, rng, fields.window, fields.num_frames, settings.decoder)
    return fit_frames(frames, task.height, task.width).numpy()


def image_clip(data: bytes, task: SampleTask) -> np.ndarray:
    """(3, 1, H, W) uint8 clip from an image's bytes (EXIF orientation applied)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except Exception as error:
        raise SkipSample("decode_error", f"image: {error}") from error
    return fit_frames(pixels[None], task.height, task.width).numpy()


def latent_of(members: dict[str, bytes], shape: tuple[int, int, int, int]) -> np.ndarray:
    """A precomputed (C, f, h, w) latent in its stored dtype; raises SkipSample for a missing, other-shaped
    or non-finite one."""
    if LATENT_MEMBER not in members:
        raise SkipSample("missing_latent")
    try:
        latent = load_npy(members[LATENT_MEMBER])
    except ValueError as error:
        raise SkipSample("bad_latent", str(error)) from error
    if tuple(latent.shape) != shape:
        raise SkipSample("bad_latent", f"latent {latent.shape} != {shape} of its bucket")
    if latent.dtype.kind != "f":
        raise SkipSample("bad_latent", f"dtype {latent.dtype} is not floating point")
    if not all_finite(latent):
        raise SkipSample("bad_latent", "non-finite values")
    return latent


EXPONENT_MASKS = {2: (np.uint16, 0x7C00), 4: (np.uint32, 0x7F800000), 8: (np.uint64, 0x7FF0000000000000)}


def all_finite(array: np.ndarray) -> bool:
    """No inf or NaN in a float array: no element has every exponent bit set (integer ops, fast for float16)."""
    if array.dtype.itemsize not in EXPONENT_MASKS:
        return bool(np.isfinite(array).all())
    bits, mask = EXPONENT_MASKS[array.dtype.itemsize]
    exponent = np.bitwise_and(array.view(bits), bits(mask))
    return not bool((exponent == mask).any())


def text_of(members: dict[str, bytes]) -> tuple[np.ndarray, np.ndarray] | None:
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
    return text, mask
