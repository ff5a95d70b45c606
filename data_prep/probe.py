"""Probe one input video, decide whether it is usable, and cut it into the clips that go into shards.

`prepare_source` runs in a worker process (see `workers.py`): it hashes the file, reads its
metadata with PyAV (frames, fps, size, duration, codec, rotation) in one pass over the packets
that also decodes the first frame to prove the stream decodes, applies the filters, and plans the
clips. The frame count leaves out frames an edit list drops, as every decoder of the loader does,
so the `num_frames` a shard records is what decord, torchcodec and PyAV each return. A clip keeps
the original bytes (plus a frame window when the input named one) unless it must be re-encoded:
when a long video is split into clips, when the video carries a rotation, or when `max_side` asks
for a smaller copy. Re-encodes are H.264 at `crf`, upright, with even sides.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field

import av
import numpy as np

from sora_train.video_io import Mp4Encoder, counts_as_frame

from .sources import SourceItem


@dataclass(frozen=True)
class PrepOptions:
    """The filters and clip rules of one `sora-prep shards` run."""

    min_seconds: float = 1.0
    max_seconds: float | None = None
    min_side: int = 64
    max_aspect: float = 3.0
    clip_seconds: float | None = None
    max_side: int | None = None
    crf: int = 18


@dataclass(frozen=True)
class VideoProbe:
    """What a video file holds. width × height are as stored; `rotation` (degrees) is applied on display."""

    num_frames: int
    fps: float
    width: int
    height: int
    codec: str
    rotation: int
    content_hash: str  # first 16 hex digits of the file's sha256

    @property
    def duration(self) -> float:
        """Seconds, from the frame count and rate."""
        return self.num_frames / self.fps

    @property
    def display_size(self) -> tuple[int, int]:
        """(width, height) once the rotation is applied."""
        return (self.height, self.width) if self.rotation % 180 == 90 else (self.width, self.height)


@dataclass(frozen=True)
class PlannedClip:
    """One output sample: a window of the source, and new bytes when it was re-encoded."""

    start: float
    end: float
    num_frames: int
    width: int
    height: int
    frame_window: tuple[int, int] | None  # [first, last) frame of the original bytes; None: all of `data`
    data: bytes | None = None  # None: the sample is the original file


@dataclass(frozen=True)
class Rejected:
    """An input that produced no sample, and why."""

    reason: str
    detail: str = ""


@dataclass(frozen=True)
class PreparedSource:
    """A usable input: its probe and the clips cut from it."""

    probe: VideoProbe
    clips: list[PlannedClip] = field(default_factory=list)


def file_hash(path: str) -> str:
    """First 16 hex digits of the sha256 of a file's bytes."""
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()[:16]


def probe_video(path: str) -> VideoProbe | Rejected:
    """Metadata of the video at `path`, or why it cannot be used (unreadable, no stream, zero frames)."""
    try:
        content_hash = file_hash(path)
        with av.open(path) as container:
            if not container.streams.video:
                return Rejected("no_video_stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            num_frames, stored, torn, first = 0, 0, False, None
            for packet in container.demux(stream):  # count every frame; decode until the first one emerges
                num_frames += counts_as_frame(packet)  # the loader's decoders count the same frames
                stored += packet.size > 0  # the last, empty packet only flushes the decoder
                torn = torn or packet.is_corrupt  # a packet the file ends inside
                if first is None:
                    first = next(iter(packet.decode()), None)
            if torn or 0 < stored < stream.frames:  # the container lists frames the file does not hold
                return Rejected(
                    "truncated", f"the container lists {stream.frames} frames, the file holds {stored}"
                )
            if num_frames == 0:
                return Rejected("zero_frames")
            if not rate or float(rate) <= 0:
                return Rejected("unreadable", "no frame rate")
            if first is None:
                return Rejected("zero_frames", "no frame decodes")
            return VideoProbe(
                num_frames=num_frames,
                fps=float(rate),
                width=first.width,
                height=first.height,
                codec=stream.codec_context.name,
                rotation=int(first.rotation or 0) % 360,
                content_hash=content_hash,
            )
    except (av.FFmpegError, OSError, ValueError, IndexError, StopIteration) as error:
        return Rejected("unreadable", f"{type(error).__name__}: {error}")


def check_filters(probe: VideoProbe, start: float, end: float, options: PrepOptions) -> Rejected | None:
    """Why this window of the video fails the run's filters, or None when it passes."""
    width, height = probe.display_size
    seconds = end - start
    shortest = max(options.min_seconds, options.clip_seconds or 0.0)
    if probe.num_frames < 2 or seconds < shortest:
        return Rejected("too_short", f"{seconds:.2f}s < {shortest:g}s")
    if options.max_seconds is not None and seconds > options.max_seconds:
        return Rejected("too_long", f"{seconds:.2f}s > {options.max_seconds:g}s")
    if min(width, height) < options.min_side:
        return Rejected("too_small", f"{width}x{height}, shorter side < {options.min_side}")
    if max(width, height) / min(width, height) > options.max_aspect:
        return Rejected("bad_aspect_ratio", f"{width}x{height} beyond {options.max_aspect:g}:1")
    return None


def output_size(probe: VideoProbe, max_side: int | None) -> tuple[int, int]:
    """(width, height) of a re-encode: upright, long side at most `max_side`, even sides."""
    width, height = probe.display_size
    scale = min(1.0, max_side / max(width, height)) if max_side else 1.0
    return max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2)


def plan_windows(probe: VideoProbe, start: float, end: float, options: PrepOptions) -> list[tuple[int, int]]:
    """[first, last) frame windows of the clips: one for the whole window, or fixed-length pieces."""
    first, last = round(start * probe.fps), min(probe.num_frames, round(end * probe.fps))
    if not options.clip_seconds:
        return [(first, last)]
    length = max(1, round(options.clip_seconds * probe.fps))
    return [(a, a + length) for a in range(first, last - length + 1, length)]


def _reencode(
    path: str, probe: VideoProbe, windows: list[tuple[int, int]], options: PrepOptions
) -> list[bytes]:
    """Decode the video once and encode each window as its own upright mp4."""
    width, height = output_size(probe, options.max_side)
    stored = (height, width) if probe.rotation % 180 == 90 else (width, height)  # size before rotation
    outputs: list[bytes] = []
    encoder: Mp4Encoder | None = None
    pending = iter(windows)
    window = next(pending, None)
    with av.open(path) as container:
        for index, frame in enumerate(container.decode(container.streams.video[0])):
            if window is None:
                break
            if index < window[0]:
                continue
            if encoder is None:
                encoder = Mp4Encoder(height, width, probe.fps, options.crf)
            pixels = frame.reformat(width=stored[0], height=stored[1], format="rgb24").to_ndarray()
            encoder.add(np.ascontiguousarray(np.rot90(pixels, k=probe.rotation // 90)))
            if index + 1 == window[1]:
                outputs.append(encoder.finish())
                encoder, window = None, next(pending, None)
    if len(outputs) != len(windows):
        raise ValueError(f"decoded {len(outputs)} of {len(windows)} clips; the file ends early")
    return outputs


def prepare_source(item: SourceItem, options: PrepOptions) -> PreparedSource | Rejected:
    """Probe, filter and cut one input (run in a worker process; never raises for a bad file)."""
    probe = probe_video(item.path)
    if isinstance(probe, Rejected):
        return probe
    start = max(0.0, item.start or 0.0)
    end = min(probe.duration, item.end if item.end is not None else math.inf)
    rejected = check_filters(probe, start, end, options)
    if rejected is not None:
        return rejected
    windows = plan_windows(probe, start, end, options)
    too_big = options.max_side is not None and max(probe.width, probe.height) > options.max_side
    if not (options.clip_seconds or probe.rotation or too_big):
        width, height = probe.display_size
        whole = windows[0] == (0, probe.num_frames)
        clip = PlannedClip(
            start, end, windows[0][1] - windows[0][0], width, height, None if whole else windows[0]
        )
        return PreparedSource(probe, [clip])
    try:
        encoded = _reencode(item.path, probe, windows, options)
    except Exception as error:  # a stream that probes but fails mid-decode: reject, keep the run going
        return Rejected("unreadable", f"re-encode failed: {type(error).__name__}: {error}")
    width, height = output_size(probe, options.max_side)
    clips = [
        PlannedClip(a / probe.fps, b / probe.fps, b - a, width, height, None, data)
        for (a, b), data in zip(windows, encoded, strict=True)
    ]
    return PreparedSource(probe, clips)


def prepare_item(item: SourceItem, options: PrepOptions) -> PreparedSource | Rejected:
    """Worker entry point: reject a missing caption or file before probing, else `prepare_source`."""
    if item.caption is None:
        return Rejected("missing_caption", item.caption_error)
    if not os.path.exists(item.path):
        return Rejected("unreadable", "no such file")
    return prepare_source(item, options)
