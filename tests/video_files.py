"""Real video files for data-preparation tests, written with PyAV (no downloads)."""

from __future__ import annotations

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
) -> Path:
    """Write an H.264 video (optionally with a display rotation and an AAC track); 0 frames allowed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format=container_format) as container:
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
