"""mp4 bytes -> a fixed-shape clip: temporal sampling, decode, aspect-preserving resize, centre crop.

decord decodes; when it fails on a file (some widths, broken indexes) PyAV decodes instead.
A clip that cannot be produced raises `SkipSample` with a reason; it is never zero-filled.
Shape legend: F frames, H height, W width, C = 3 channels.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

FrameWindow = tuple[int, int] | list[int] | None  # [first, last) source frames a clip may use


class SkipSample(Exception):
    """This sample cannot be used; `reason` is the counter it is recorded under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# Where a clip is cut from its video (`data.window`): a random stretch, or the centre.
ClipWindow = Literal["random", "center"]
# `data.decoder`: auto takes decord where installed, else torchcodec, else PyAV.
DecoderName = Literal["auto", "decord", "torchcodec", "pyav"]


@dataclass(frozen=True)
class ClipSpec:
    """What the trainer wants from each video: F frames `stride` apart at H × W pixels.

    `window` says where the F frames come from: a random stretch of the video, or its centre.
    """

    num_frames: int
    stride: int
    height: int
    width: int
    window: ClipWindow = "random"

    @property
    def shape(self) -> tuple[int, int, int]:
        """(F, H, W) of a clip."""
        return self.num_frames, self.height, self.width

    @property
    def span(self) -> int:
        """Source frames one clip covers."""
        return (self.num_frames - 1) * self.stride + 1


def clip_stride(fps: float, target_fps: float | None, default: int) -> int:
    """Source frames between sampled frames: `default`, or the step closest to `target_fps`."""
    if not target_fps or fps <= 0:
        return default
    return max(1, round(fps / target_fps))


def _frame_count(reported: int, known: int | None) -> int:
    """Frames to choose from: the container's count, capped by a count the metadata measured."""
    return reported if known is None else min(reported, known)


def _decode_decord(
    data: bytes, spec: ClipSpec, rng: np.random.Generator, window: FrameWindow, known: int | None
) -> np.ndarray:
    import decord

    reader = decord.VideoReader(io.BytesIO(data), num_threads=1)  # applies the display rotation
    try:
        indices = choose_indices(_frame_count(len(reader), known), spec, rng, window)
        return reader.get_batch(indices.tolist()).asnumpy()
    finally:
        del reader  # decord leaks if readers are kept around


def _decode_pyav(
    data: bytes, spec: ClipSpec, rng: np.random.Generator, window: FrameWindow, known: int | None
) -> np.ndarray:
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        indices = choose_indices(_frame_count(stream.frames, known), spec, rng, window)  # checked below
        wanted = {int(i) for i in indices}
        frames: dict[int, np.ndarray] = {}
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted:  # upright, as decord and players show it
                frames[index] = np.rot90(frame.to_ndarray(format="rgb24"), k=(frame.rotation or 0) // 90)
            if index >= indices.max():
                break
    if len(frames) < len(wanted):
        raise SkipSample("too_short", f"decoded {len(frames)} of {len(wanted)} requested frames")
    return np.stack([frames[int(i)] for i in indices])


def choose_indices(
    num_frames: int, spec: ClipSpec, rng: np.random.Generator, window: FrameWindow = None
) -> np.ndarray:
    """F frame indices `stride` apart from a random (or the centred) stretch; raises SkipSample if too short.

    `window` = [first, last) restricts the choice to part of the video (a clip named by the
    sample's `frame_window`); None means all `num_frames` frames.
    """
    first, last = (0, num_frames) if window is None else (int(window[0]), min(int(window[1]), num_frames))
    available = last - first
    if available < spec.span:
        raise SkipSample("too_short", f"{max(0, available)} frames < {spec.span} needed")
    spare = available - spec.span
    start = spare // 2 if spec.window == "center" else int(rng.integers(0, spare + 1))
    return first + start + spec.stride * np.arange(spec.num_frames)


def decode_frames(
    data: bytes,
    spec: ClipSpec,
    rng: np.random.Generator,
    window: FrameWindow = None,
    known_frames: int | None = None,
) -> np.ndarray:
    """mp4 bytes -> (F, H0, W0, 3) uint8 source frames, upright; raises SkipSample.

    `window` = [first, last) frames to cut from (see `choose_indices`); `known_frames` caps the
    container's frame count with one measured by decoding (data preparation records it), so a
    header that over-reports never asks for frames that do not exist.
    decord first; PyAV when decord cannot open or decode the file. Both draw the window from a
    copy of `rng`, so the fallback picks the same frames.
    """
    state = rng.bit_generator.state
    try:
        frames = _decode_decord(data, spec, rng, window, known_frames)
    except SkipSample:
        raise
    except Exception:
        rng.bit_generator.state = state
        try:
            frames = _decode_pyav(data, spec, rng, window, known_frames)
        except SkipSample:
            raise
        except Exception as error:
            raise SkipSample("decode_error", str(error)) from error
    if frames.ndim != 4 or frames.shape[0] != spec.num_frames or frames.shape[-1] != 3:
        raise SkipSample("decode_error", f"decoded frames shaped {frames.shape}")
    return frames


def decode_clip(
    data: bytes,
    spec: ClipSpec,
    rng: np.random.Generator,
    window: FrameWindow = None,
    known_frames: int | None = None,
) -> torch.Tensor:
    """mp4 bytes -> (C, F, H, W) float32 in [-1, 1] at the spec's size; raises SkipSample (see `decode_frames`)."""
    return to_unit_range(
        fit_frames(decode_frames(data, spec, rng, window, known_frames), spec.height, spec.width)
    )


def to_unit_range(video: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels -> `dtype` in [-1, 1]."""
    return video.to(dtype) / 127.5 - 1.0


def fit_frames(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """(F, H0, W0, 3) uint8 -> (3, F, height, width) uint8.

    Crops the centre of the frame to the target's aspect ratio, then resizes (antialiased
    bilinear, on uint8 in channels-last layout, which is several times faster than float).
    """
    video = rearrange(torch.from_numpy(np.require(frames, requirements=["C", "W"])), "f h w c -> f c h w")
    src_h, src_w = video.shape[-2:]
    scale = max(height / src_h, width / src_w)
    crop_h, crop_w = min(src_h, round(height / scale)), min(src_w, round(width / scale))
    top, left = (src_h - crop_h) // 2, (src_w - crop_w) // 2
    video = video[:, :, top : top + crop_h, left : left + crop_w]
    if (crop_h, crop_w) != (height, width):
        video = F.interpolate(
            video.contiguous(memory_format=torch.channels_last),
            size=(height, width), mode="bilinear", antialias=True, align_corners=False,
        )  # fmt: skip
    return rearrange(video, "f c h w -> c f h w").contiguous()
