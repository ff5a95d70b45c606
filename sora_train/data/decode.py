"""mp4 bytes -> a fixed-shape clip: temporal sampling, decode, aspect-preserving resize, centre crop.

Three decoders sit behind one small interface (`OpenVideo`: the frame count, the frame rate, the
frames at given indices): decord, torchcodec and PyAV. `data.decoder` names one, or `auto` takes
decord where it is installed, else torchcodec, else PyAV (always installed). When decord or
torchcodec fails on a file (decord: some widths, broken indexes) PyAV decodes it instead. Every
decoder counts only the frames it can show (an edit list's dropped frames are not counted, the
rule the data preparation's probe uses), returns RGB uint8 frames upright, and draws the same
frame indices from the same generator. A clip that cannot be produced raises `SkipSample` with a
reason; it is never zero-filled.
Shape legend: F frames, H height, W width, C = 3 channels.
"""

from __future__ import annotations

import functools
import importlib
import io
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from ..video_io import counts_as_frame

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
AUTO_ORDER = ("decord", "torchcodec", "pyav")  # what `auto` tries, first usable wins
_MODULES = {"decord": "decord", "torchcodec": "torchcodec.decoders", "pyav": "av"}
_INSTALL = {
    "decord": "pip install 'sora-train[video]' (decord publishes wheels for x86-64 Linux and Windows only)",
    "torchcodec": (
        "pip install 'sora-train[video]' (torchcodec also needs FFmpeg's shared libraries, versions 4 to 8, "
        "and a release built for the installed torch)"
    ),
    "pyav": "pip install av",
}


class DecoderUnavailable(ValueError):
    """A decoder named in the configuration cannot be used on this machine."""


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
    """Frames to choose from: the decoder's count, capped by a count the metadata measured (a
    count of 0 is unknown: the metadata's is used)."""
    if known is None:
        return reported
    return min(reported, known) if reported > 0 else known


class OpenVideo(Protocol):
    """A video opened by one decoder: the frames it can show, their rate, and frames by index."""

    num_frames: int
    fps: float

    def read(self, indices: np.ndarray) -> np.ndarray:
        """(len(indices), H, W, 3) uint8 RGB frames, upright; raises SkipSample when too few exist."""
        ...

    def close(self) -> None:
        """Release the decoder's native resources."""
        ...


class _DecordVideo:
    """decord: applies the display rotation; its count includes frames an edit list drops (they
    carry negative times, and reading them repeats the last frame), so those are left out."""

    def __init__(self, data: bytes):
        import decord

        self._reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
        total = len(self._reader)
        starts = self._reader.get_frame_timestamp(list(range(total)))[:, 0] if total else np.zeros(0)
        self.num_frames = total - int((starts < 0).sum())
        self.fps = float(self._reader.get_avg_fps())

    def read(self, indices: np.ndarray) -> np.ndarray:
        return self._reader.get_batch(indices.tolist()).asnumpy()

    def close(self) -> None:
        del self._reader  # decord leaks if readers are kept around


class _TorchcodecVideo:
    """torchcodec on the CPU, one FFmpeg thread; exact mode scans the file once, so the count is
    the frames that decode and indices are frame-accurate on variable frame rates."""

    def __init__(self, data: bytes):
        from torchcodec.decoders import VideoDecoder

        self._decoder = VideoDecoder(
            data, seek_mode="exact", dimension_order="NHWC", num_ffmpeg_threads=1, device="cpu"
        )
        metadata = self._decoder.metadata
        self.num_frames = int(metadata.num_frames or 0)
        self.fps = float(metadata.average_fps or 0.0)

    def read(self, indices: np.ndarray) -> np.ndarray:
        return self._decoder.get_frames_at(indices.tolist()).data.numpy()

    def close(self) -> None:
        del self._decoder


class _PyAVVideo:
    """PyAV: counts the frames by demuxing (no decode), then decodes from the start up to the last
    wanted frame on one thread (as the other decoders do), rotating each to upright as decord and
    players show it."""

    def __init__(self, data: bytes):
        import av

        self._av, self._data = av, data
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            self.fps = float(stream.average_rate or stream.guessed_rate or 0.0)
            self.num_frames = sum(counts_as_frame(packet) for packet in container.demux(stream))

    def read(self, indices: np.ndarray) -> np.ndarray:
        wanted = {int(i) for i in indices}
        last = max(wanted)
        frames: dict[int, np.ndarray] = {}
        with self._av.open(io.BytesIO(self._data)) as container:
            stream = container.streams.video[0]
            stream.thread_count = 1  # FFmpeg would start a thread per core in each decode worker
            for index, frame in enumerate(container.decode(stream)):
                if index in wanted:
                    frames[index] = np.rot90(frame.to_ndarray(format="rgb24"), k=(frame.rotation or 0) // 90)
                if index >= last:
                    break
        if len(frames) < len(wanted):
            raise SkipSample("too_short", f"decoded {len(frames)} of {len(wanted)} requested frames")
        return np.stack([frames[int(i)] for i in indices])

    def close(self) -> None:
        self._data = b""


OPENERS: dict[str, Callable[[bytes], OpenVideo]] = {
    "decord": _DecordVideo,
    "torchcodec": _TorchcodecVideo,
    "pyav": _PyAVVideo,
}


@functools.cache
def decoder_problem(name: str) -> str | None:
    """Why decoder `name` cannot be used here (not installed, or its native libraries do not load), or None."""
    try:  # an installed torchcodec without FFmpeg's or CUDA's libraries raises OSError or RuntimeError
        importlib.import_module(_MODULES[name])
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [""])[0]
        return f"{type(error).__name__}: {first_line}"
    return None


def installed_decoders() -> list[str]:
    """The decoders usable on this machine, in `auto`'s order."""
    return [name for name in AUTO_ORDER if decoder_problem(name) is None]


def resolve_decoder(name: DecoderName | str, option: str = "data.decoder") -> str:
    """The decoder `name` stands for on this machine: `auto`'s pick, or `name` itself once it is
    known to load. Raises DecoderUnavailable naming `option` and how to install it."""
    if name == "auto":
        usable = installed_decoders()
        if usable:
            return usable[0]
        raise DecoderUnavailable(f"{option}=auto: no video decoder loads here; {_INSTALL['pyav']}")
    if name not in OPENERS:
        raise DecoderUnavailable(f"{option}={name}: not a decoder; choose one of auto, {', '.join(OPENERS)}")
    problem = decoder_problem(name)
    if problem is not None:
        others = ", ".join(n for n in ("auto", *AUTO_ORDER) if n != name)
        raise DecoderUnavailable(
            f"{option}={name}: {name} cannot be used here ({problem}); {_INSTALL[name]}, or set {option} to one of "
            f"{others}"
        )
    return name


@contextmanager
def open_video(data: bytes, decoder: str) -> Iterator[OpenVideo]:
    """The video in `data` opened with the (resolved) `decoder`, closed on exit."""
    video = OPENERS[decoder](data)
    try:
        yield video
    finally:
        video.close()


def _decode_with(
    decoder: str,
    data: bytes,
    spec: ClipSpec,
    rng: np.random.Generator,
    window: FrameWindow,
    known: int | None,
) -> np.ndarray:
    with open_video(data, decoder) as video:
        return video.read(choose_indices(_frame_count(video.num_frames, known), spec, rng, window))


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
    decoder: DecoderName | str = "auto",
) -> np.ndarray:
    """mp4 bytes -> (F, H0, W0, 3) uint8 source frames, upright; raises SkipSample.

    `window` = [first, last) frames to cut from (see `choose_indices`); `known_frames` caps the
    decoder's frame count with one measured by the data preparation's probe, so a header that
    over-reports never asks for frames that do not exist. `decoder` decodes (see the module
    docstring); PyAV takes over when decord or torchcodec cannot open or decode the file, drawing
    the window from a copy of `rng`, so the fallback picks the same frames.
    """
    name = resolve_decoder(decoder)
    state = rng.bit_generator.state
    try:
        frames = _decode_with(name, data, spec, rng, window, known_frames)
    except SkipSample:
        raise
    except Exception as error:
        if name == "pyav":
            raise SkipSample("decode_error", str(error)) from error
        rng.bit_generator.state = state
        try:
            frames = _decode_with("pyav", data, spec, rng, window, known_frames)
        except SkipSample:
            raise
        except Exception as fallback_error:
            raise SkipSample("decode_error", str(fallback_error)) from fallback_error
    if frames.ndim != 4 or frames.shape[0] != spec.num_frames or frames.shape[-1] != 3:
        raise SkipSample("decode_error", f"decoded frames shaped {frames.shape}")
    return frames


def decode_video(data: bytes, decoder: DecoderName | str = "auto") -> tuple[np.ndarray, float]:
    """Every frame of a video: ((F, H, W, 3) uint8 upright, fps); raises SkipSample.

    `decoder` as for `decode_frames`, with the same PyAV fallback.
    """
    name = resolve_decoder(decoder)
    for attempt in dict.fromkeys((name, "pyav")):
        try:
            with open_video(data, attempt) as video:
                if video.num_frames < 1:
                    raise SkipSample("too_short", "no frame")
                return video.read(np.arange(video.num_frames)), video.fps
        except SkipSample:
            raise
        except Exception as error:
            failure = error
    raise SkipSample("decode_error", str(failure)) from failure


def decode_clip(
    data: bytes,
    spec: ClipSpec,
    rng: np.random.Generator,
    window: FrameWindow = None,
    known_frames: int | None = None,
    decoder: DecoderName | str = "auto",
) -> torch.Tensor:
    """mp4 bytes -> (C, F, H, W) float32 in [-1, 1] at the spec's size; raises SkipSample (see `decode_frames`)."""
    frames = decode_frames(data, spec, rng, window, known_frames, decoder)
    return to_unit_range(fit_frames(frames, spec.height, spec.width))


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
