"""The fields of a sample's json the loader reads, each checked once, the same way at index time
and at decode time.

A field that is absent is absent (the container is probed instead). A field that is present with
the wrong type, a value that is not finite, negative, not a whole number where one is needed, or
beyond any real video (`MAX_SIDE`, `MAX_FRAMES`, `MAX_FPS`) makes the sample a counted
`bad_metadata` skip naming the field and the value, never an exception out of the loader.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .decode import SkipSample

MAX_SIDE = 1 << 16  # pixels
MAX_FRAMES = 10**8  # over a month at 30 fps
MAX_FPS = 1000.0


def _bad(field: str, value: object, expected: str) -> SkipSample:
    return SkipSample("bad_metadata", f"{field}={value!r:.80}: expected {expected}")


def whole_number(meta: dict, field: str, low: int, high: int) -> int | None:
    """`meta[field]` as an int in [low, high]; None when absent (or null)."""
    value = meta.get(field)
    return None if value is None else _whole(field, value, low, high)


def _whole(field: str, value: object, low: int, high: int) -> int:
    """`value` (of `field`) as an int in [low, high] (raises SkipSample("bad_metadata"))."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and value == int(value) and low <= value <= high):
        raise _bad(field, value, f"a whole number in [{low}, {high}]")
    return int(value)


def frame_rate(meta: dict) -> float:
    """`meta["fps"]` as a float in [0, MAX_FPS]; 0 when absent, null or 0 (unknown)."""
    value = meta.get("fps")
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= MAX_FPS:
        raise _bad("fps", value, f"a number in [0, {MAX_FPS:g}]")  # NaN fails the range too
    return float(value)


def frame_window(meta: dict) -> tuple[int, int] | None:
    """`meta["frame_window"]`, [first, last) frames of the source, as a pair with 0 <= first < last;
    None when absent."""
    value = meta.get("frame_window")
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 2:
        raise _bad("frame_window", value, "[first, last]")
    first, last = (_whole("frame_window", v, 0, MAX_FRAMES) for v in value)
    if first >= last:
        raise _bad("frame_window", value, "[first, last] with 0 <= first < last")
    return first, last


@dataclass(frozen=True)
class VideoFields:
    """What a video or image sample's json says of it (None: not said)."""

    width: int | None
    height: int | None
    num_frames: int | None  # frames in the media bytes (with a window: the whole source's)
    fps: float
    window: tuple[int, int] | None  # [first, last) frames of the media the sample is cut from

    @property
    def clip_frames(self) -> int | None:
        """Frames the sample offers: its window's (cut to the media's end), else all; None: not said."""
        if self.window is None:
            return self.num_frames
        first, last = self.window
        return (last if self.num_frames is None else min(self.num_frames, last)) - first


def video_fields(meta: object) -> VideoFields:
    """The checked fields of a sample's parsed json (raises SkipSample("bad_metadata"))."""
    if not isinstance(meta, dict):
        raise _bad("json", meta, "an object")
    return VideoFields(
        width=whole_number(meta, "width", 1, MAX_SIDE),
        height=whole_number(meta, "height", 1, MAX_SIDE),
        num_frames=whole_number(meta, "num_frames", 1, MAX_FRAMES),
        fps=frame_rate(meta),
        window=frame_window(meta),
    )
