"""Which bucket each sample of a shard goes to, decided once per distinct shape, not per sample.

A video's bucket depends on its width and height, on whether it is an image, and on which of
the table's frame counts it holds enough frames for at its stride (the stride follows its fps when
a target rate is set). Those four make a shape key; a shard of 10,000 samples has a few dozen
distinct keys, and `BucketTable.place` runs once per key for the whole corpus.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .buckets import BucketTable
from .decode import clip_stride
from .sample_index import KINDS, SampleIndex

LATENT = KINDS.index("latent")


@dataclass
class Placer:
    """Places samples in a table's buckets; remembers every shape it has placed."""

    table: BucketTable
    target_fps: float | None = None
    max_upscale: float = float("inf")
    _placed: dict[int | str, int | str] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._frames = np.unique([bucket.frames for bucket in self.table.buckets])  # (distinct,)

    def strides(self, fps: np.ndarray) -> np.ndarray:
        """(N,) source frames between sampled frames for videos at `fps` (as `clip_stride`)."""
        default = np.full(len(fps), self.table.stride, np.int64)
        if not self.target_fps:
            return default
        stepped = np.maximum(1, np.round(fps / self.target_fps)).astype(np.int64)  # rounds half to even
        return np.where(fps > 0, stepped, default)

    def shape_keys(self, records: np.ndarray) -> np.ndarray:
        """(N,) int64 key of each video or image record: width, height, how many of the table's
        frame counts it holds at its stride, and whether it is an image."""
        width, height = records["width"].astype(np.int64), records["height"].astype(np.int64)
        frames, strides = records["frames"].astype(np.int64), self.strides(records["fps"])
        held = sum(((count - 1) * strides + 1 <= frames).astype(np.int64) for count in self._frames.tolist())
        return (width << 27) | (height << 10) | (held << 1) | (frames == 1)

    def _bucket_of(self, key: int | str, record: np.void | None) -> int | str:
        """The bucket index for a key (placed once), or the reason it has none."""
        if key not in self._placed:
            if record is None:  # a latent: its bucket is named
                try:
                    self._placed[key] = self.table.index(str(key))
                except KeyError:
                    self._placed[key] = "wrong_bucket"
            else:
                stride = clip_stride(float(record["fps"]), self.target_fps, self.table.stride)
                placed = self.table.place(
                    int(record["width"]),
                    int(record["height"]),
                    int(record["frames"]),
                    stride,
                    self.max_upscale,
                )
                self._placed[key] = placed if isinstance(placed, str) else self.table.buckets.index(placed)
        return self._placed[key]

    def place(self, shard: SampleIndex, rejected: Counter) -> np.ndarray:
        """(samples,) int16 bucket of each of a shard's samples, -1 where none takes it; the reasons
        are counted in `rejected`."""
        records = shard.records
        buckets = np.full(len(records), -1, np.int16)
        latent = records["kind"] == LATENT
        has_latents = bool(latent.any())
        media = np.flatnonzero(~latent) if has_latents else slice(None)
        videos = records[media] if has_latents else records  # (M,) no copy when there is no latent
        if len(videos):
            keys, first, inverse = np.unique(self.shape_keys(videos), return_index=True, return_inverse=True)
            codes = [self._bucket_of(int(key), videos[i]) for key, i in zip(keys, first, strict=True)]
            self._assign(buckets, media, codes, inverse.reshape(-1), rejected)
        if has_latents:
            where = np.flatnonzero(latent)
            codes = [self._bucket_of(name, None) for name in shard.latent_buckets]
            self._assign(buckets, where, codes, records["latent_bucket"][where].astype(np.int64), rejected)
        return buckets

    @staticmethod
    def _assign(
        buckets: np.ndarray,
        where: np.ndarray | slice,
        codes: list[int | str],
        choice: np.ndarray,
        rejected: Counter,
    ) -> None:
        """buckets[where] = codes[choice] for bucket codes; reasons counted, their samples left at -1."""
        table = np.array([code if isinstance(code, int) else -1 for code in codes], np.int16)
        buckets[where] = table[choice]
        counts = np.bincount(choice, minlength=len(codes))
        for code, count in zip(codes, counts.tolist(), strict=True):
            if isinstance(code, str) and count:
                rejected[code] += count
