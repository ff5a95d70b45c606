"""Write and read mp4 files: PyAV encodes (H.264), decord decodes.

Frames are uint8 arrays shaped (F, H, W, 3), RGB.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np


def encode_mp4(frames: np.ndarray, fps: float = 8.0, crf: int = 18) -> bytes:
    """Encode (F, H, W, 3) uint8 RGB frames as H.264 mp4 bytes (yuv420p, so H and W must be even)."""
    import av

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames shaped (F, H, W, 3), got {frames.dtype} {frames.shape}")
    num_frames, height, width, _ = frames.shape
    if num_frames == 0:
        raise ValueError("cannot encode a video with no frames")
    if height % 2 or width % 2:
        raise ValueError(f"H.264 yuv420p needs even sides, got {height}x{width}")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=round(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # mbtree=0: x264's macroblock tree makes output vary between runs; without it, same frames, same bytes.
        stream.options = {"crf": str(crf), "preset": "veryfast", "x264-params": "mbtree=0"}
        for frame in frames:
            for packet in stream.encode(
                av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            ):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def write_mp4(path: str | Path, frames: np.ndarray, fps: float = 8.0) -> Path:
    """Encode frames and write them to `path` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_mp4(frames, fps))
    return path


def read_video(source: str | Path | bytes) -> tuple[np.ndarray, float]:
    """Decode every frame of an mp4 (path or bytes) with decord: ((F, H, W, 3) uint8, fps)."""
    import decord

    handle = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    reader = decord.VideoReader(handle, num_threads=1)
    frames = reader.get_batch(list(range(len(reader)))).asnumpy()
    fps = float(reader.get_avg_fps())
    del reader
    return frames, fps
