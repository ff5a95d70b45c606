"""Real video files for data-preparation tests, written with PyAV (no downloads)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def gradient_frames(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """(F, H, W, 3) uint8: a colour gradient that drifts a little each frame (distinct per seed)."""
    y, x = np.mgrid[0:height, 0:width]
    frames = []
    for t in range(num_frames):
        red = (x * 255 // max(1, width - 1) + 7 * t + 31 * seed) % 256
        green = (y * 255 // max(1, height - 1) + 3 * t) % 256
        blue = np.full_like(red, (40 * seed + 5 * t) % 256)
        frames.append(np.stack([red, green, blue], axis=-1).astype(np.uint8))
    return np.stack(frames)


def add_silence(container: av.container.OutputContainer) -> None:
    """Mux a short silent AAC track into an open output container."""
    sound = container.add_stream("aac", rate=16000)
    sound.layout = "mono"
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
    frame.sample_rate, frame.pts = 16000, 0
    for packet in [*sound.encode(frame), *sound.encode()]:
        container.mux(packet)


def write_video(
    path: Path,
    num_frames: int,
    height: int,
    width: int,
    fps: int = 8,
    seed: int = 0,
    rotation: int | None = None,
    audio: bool = False,
    container_format: str = "mp4",
    faststart: bool = False,
) -> Path:
    """Write an H.264 video (optionally with a display rotation and an AAC track; `faststart`: the
    frame index before the frames, as streaming sites serve mp4); 0 frames allowed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), mode="w", format=container_format, options=options) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"x264-params": "mbtree=0"}
        if rotation is not None:
            stream.set_display_rotation(rotation)
        if audio:
            add_silence(container)
        for pixels in gradient_frames(num_frames, height, width, seed) if num_frames else []:
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_audio_only(path: Path) -> Path:
    """An mp4 with a sound track and no video stream."""
    with av.open(str(path), mode="w", format="mp4") as container:
        add_silence(container)
    return path


def write_timed_video(path: Path, pts: list[int], height: int = 32, width: int = 64, fps: int = 8) -> Path:
    """An H.264 mp4 whose frame i (gradient_frames' frame i) is stamped `pts[i]` ticks of 1/fps s.

    Stamps that grow by more than one tick make a variable frame rate. Negative stamps make the muxer
    write an edit list that hides those frames: the header still counts every frame, while players,
    the decoders and the probe show only the frames from time 0 on.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tick = Fraction(1, fps)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"x264-params": "mbtree=0"}
        stream.codec_context.time_base = tick
        for stamp, pixels in zip(pts, gradient_frames(len(pts), height, width), strict=True):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts, frame.time_base = stamp, tick
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def damaged(data: bytes, seed: int) -> bytes:
    """`data` damaged reproducibly: even seeds cut it at a random point, odd seeds flip 8 random bytes."""
    rng = np.random.default_rng(seed)
    if seed % 2 == 0:
        return data[: int(rng.integers(1, len(data)))]
    damaged_bytes = np.frombuffer(data, np.uint8).copy()
    positions = rng.integers(0, len(damaged_bytes), 8)
    damaged_bytes[positions] ^= rng.integers(1, 256, 8).astype(np.uint8)
    return damaged_bytes.tobytes()


def decode_outcome(item: tuple[str, bytes]) -> tuple[str, str]:
    """(outcome, detail) of decoding 4 frames 3 apart from `item` = (decoder, mp4 bytes): "frames"
    with their shape, dtype and count of all-zero frames, "skipped" with the SkipSample reason, or
    "raised" with any other exception (a bug). Top level, so worker processes can run it."""
    from sora_train.data.decode import ClipSpec, SkipSample, decode_frames

    decoder, data = item
    try:
        frames = decode_frames(data, ClipSpec(4, 3, 16, 16), np.random.default_rng(0), decoder=decoder)
    except SkipSample as skip:
        return "skipped", skip.reason
    except Exception as error:
        return "raised", f"{type(error).__name__}: {error}"
    blank = int((frames.reshape(len(frames), -1).max(axis=1) == 0).sum())
    return "frames", f"{frames.shape} {frames.dtype} {blank} blank"
