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
    """Decode every frame of an mp4 (path or bytes): ((F, H, W, 3) uint8, fps).

    decord decodes; PyAV takes over for the files decord cannot read (some frame widths, such as
    16, 24, 48 and 72 pixels, make decord fail).
    """
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    try:
        import decord

        reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
        frames = reader.get_batch(list(range(len(reader)))).asnumpy()
        fps = float(reader.get_avg_fps())
        del reader  # decord leaks if readers are kept around
        return frames, fps
    except Exception:
        import av

        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(stream)])
            return frames, float(stream.average_rate or 0.0)
