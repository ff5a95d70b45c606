"""Write and read mp4 files: PyAV encodes (H.264); reading goes through the decoders of `data/decode.py`.

Frames are uint8 arrays shaped (F, H, W, 3), RGB. This module imports no torch (`sora-prep`'s
probe workers use it and start without it).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .data.decode import DecoderName


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


def counts_as_frame(packet: Any) -> bool:
    """Whether a demuxed PyAV packet is a frame a player shows: not empty (the flush packet) and not
    dropped by an edit list. The data preparation's probe and every decoder of the loader count this way."""
    return bool(packet.size) and not packet.is_discard


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


def read_video(source: str | Path | bytes, decoder: DecoderName = "auto") -> tuple[np.ndarray, float]:
    """Decode every frame of an mp4 (path or bytes): ((F, H, W, 3) uint8, fps).

    `decoder` as `data.decoder` (auto: decord where installed, else torchcodec, else PyAV); PyAV
    takes over for the files decord cannot read (some frame widths, such as 16, 24, 48 and 72
    pixels, make decord fail). Raises ValueError for a file no decoder can read.
    """
    from .data.decode import SkipSample, decode_video  # imports torch, which the probe does without

    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    try:
        return decode_video(data, decoder)
    except SkipSample as skip:
        raise ValueError(f"not a decodable video ({skip})") from skip
