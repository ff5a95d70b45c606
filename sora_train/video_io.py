"""Write and read mp4 files: PyAV encodes (H.264), decord decodes.

Frames are uint8 arrays shaped (F, H, W, 3), RGB.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np


class Mp4Encoder:
    """Encode RGB frames one at a time into H.264 mp4 bytes (yuv420p, so H and W must be even).

    `enc = Mp4Encoder(h, w, fps)`, `enc.add(frame)` per frame, then `enc.finish()` gives the file.
    x264 runs with mbtree=0: its macroblock tree makes output vary between runs, and without
    it the same frames give the same bytes.
    """

    def __init__(self, height: int, width: int, fps: float = 8.0, crf: int = 18):
        import av

        if height % 2 or width % 2 or height <= 0 or width <= 0:
            raise ValueError(f"H.264 yuv420p needs positive even sides, got {height}x{width}")
        self._av, self.height, self.width = av, height, width
        self._buffer = io.BytesIO()
        self._container = av.open(self._buffer, mode="w", format="mp4")
        self._stream = self._container.add_stream("libx264", rate=max(1, round(fps)))
        self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, "yuv420p"
        self._stream.options = {"crf": str(crf), "preset": "veryfast", "x264-params": "mbtree=0"}
        self.frames = 0

    def add(self, frame: np.ndarray) -> None:
        """Append one (H, W, 3) uint8 RGB frame."""
        if frame.shape != (self.height, self.width, 3) or frame.dtype != np.uint8:
            raise ValueError(
                f"expected a uint8 frame shaped {(self.height, self.width, 3)}, got {frame.dtype} {frame.shape}"
            )
        video_frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        for packet in self._stream.encode(video_frame):
            self._container.mux(packet)
        self.frames += 1

    def finish(self) -> bytes:
        """Flush the encoder and return the mp4 file's bytes."""
        if self.frames == 0:
            raise ValueError("cannot encode a video with no frames")
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        return self._buffer.getvalue()


def encode_mp4(frames: np.ndarray, fps: float = 8.0, crf: int = 18) -> bytes:
    """Encode (F, H, W, 3) uint8 RGB frames as H.264 mp4 bytes (yuv420p, so H and W must be even)."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames shaped (F, H, W, 3), got {frames.dtype} {frames.shape}")
    if frames.shape[0] == 0:
        raise ValueError("cannot encode a video with no frames")
    encoder = Mp4Encoder(frames.shape[1], frames.shape[2], fps, crf)
    for frame in frames:
        encoder.add(frame)
    return encoder.finish()


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
