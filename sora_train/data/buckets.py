"""Bucket tables: the (frames, height, width) shapes a corpus is trained at.

A clip is assigned to the bucket whose aspect ratio is closest to its own (in log space), among the
buckets it has enough frames for; ties go to the bucket that needs no upscaling, then to more
frames, then to more pixels. Data preparation (manifest histograms, latent encoding) and the
trainer use this one rule, so a clip lands in the same bucket everywhere.
Tables live in configs/buckets/NAME.yaml: `stride` (source frames between sampled frames) and a
list of `buckets`, each with `frames`, `height`, `width`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..recipes import config_dir


@dataclass(frozen=True, order=True)
class Bucket:
    """F frames at H × W pixels."""

    frames: int
    height: int
    width: int

    @property
    def name(self) -> str:
        """`FxHxW`, e.g. `16x256x448`."""
        return f"{self.frames}x{self.height}x{self.width}"


@dataclass(frozen=True)
class BucketTable:
    """The buckets of one recipe and the frame stride they are sampled at."""

    buckets: tuple[Bucket, ...]
    stride: int = 1

    def __post_init__(self):
        if not self.buckets:
            raise ValueError("a bucket table needs at least one bucket")
        if self.stride < 1:
            raise ValueError(f"bucket stride must be >= 1, got {self.stride}")

    def span(self, bucket: Bucket) -> int:
        """Source frames a clip of this bucket covers."""
        return (bucket.frames - 1) * self.stride + 1

    def assign(self, width: int, height: int, num_frames: int) -> Bucket | None:
        """The bucket for a clip of `num_frames` frames at width × height, or None if it is too short."""
        fitting = [b for b in self.buckets if self.span(b) <= num_frames]
        if not fitting or width <= 0 or height <= 0:
            return None
        log_aspect = math.log(width / height)

        def preference(bucket: Bucket) -> tuple:
            aspect_gap = round(abs(math.log(bucket.width / bucket.height) - log_aspect), 6)
            upscales = bucket.width > width or bucket.height > height
            return aspect_gap, upscales, -bucket.frames, -bucket.height * bucket.width

        return min(fitting, key=preference)


def load_bucket_table(name_or_path: str | Path) -> BucketTable:
    """A table by name (configs/buckets/NAME.yaml) or from a YAML file path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        tables = config_dir() / "buckets"
        path = tables / f"{name_or_path}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in tables.glob("*.yaml"))
            raise ValueError(
                f"unknown bucket table {str(name_or_path)!r}; choose one of {known} or a .yaml path"
            )
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    return bucket_table_from_dict(spec)


def bucket_table_from_dict(spec: dict) -> BucketTable:
    """A table from `{"stride": S, "buckets": [{"frames", "height", "width"}, ...]}`."""
    try:
        buckets = tuple(Bucket(int(b["frames"]), int(b["height"]), int(b["width"])) for b in spec["buckets"])
        return BucketTable(buckets, int(spec.get("stride", 1)))
    except (KeyError, TypeError) as error:
        raise ValueError(f"bad bucket table {spec!r}: {error}") from error
