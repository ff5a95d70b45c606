"""Bucket tables: the (frames, height, width) shapes a corpus is trained at.

A clip is assigned to the bucket whose aspect ratio is closest to its own (in log space), among the
buckets it has enough frames for; ties go to the bucket that needs no upscaling, then to more
frames, then to more pixels. Data preparation (manifest histograms, latent encoding) and the
trainer use this one rule, so a clip lands in the same bucket everywhere.
Images are 1-frame clips: they go to the table's 1-frame buckets and videos to the others (a
table of one kind takes both). A bucket that needs more than `max_upscale` times enlargement is
not a candidate. Tables live in configs/buckets/NAME.yaml: `stride` (source frames between sampled
frames) and a list of `buckets`, each with `frames`, `height`, `width` and optionally
`batch_size` (per rank; otherwise derived from a token budget) and `weight` (relative sampling
frequency of the bucket's samples).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
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
    batch_size: int | None = None  # per data-parallel rank; None: from the run's token budget
    weight: float = 1.0

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
        names = [b.name for b in self.buckets]
        if len(set(names)) != len(names):
            raise ValueError(f"a bucket table lists a shape twice: {sorted(names)}")
        for bucket in self.buckets:
            if min(bucket.frames, bucket.height, bucket.width) < 1 or bucket.weight <= 0:
                raise ValueError(f"bucket {bucket.name}: sides must be >= 1 and weight > 0")
            if bucket.batch_size is not None and bucket.batch_size < 1:
                raise ValueError(f"bucket {bucket.name}: batch_size must be >= 1")

    def index(self, name: str) -> int:
        """Position of the bucket called `name` (FxHxW); raises KeyError if the table has none."""
        for position, bucket in enumerate(self.buckets):
            if bucket.name == name:
                return position
        raise KeyError(name)

    def span(self, bucket: Bucket) -> int:
        """Source frames a clip of this bucket covers."""
        return (bucket.frames - 1) * self.stride + 1

    def assign(self, width: int, height: int, num_frames: int) -> Bucket | None:
        """The bucket for a clip of `num_frames` frames at width × height, or None if it is too short."""
        placed = self.place(width, height, num_frames)
        return placed if isinstance(placed, Bucket) else None

    def place(
        self,
        width: int,
        height: int,
        num_frames: int,
        stride: int | None = None,
        max_upscale: float = math.inf,
    ) -> Bucket | str:
        """The bucket for a clip, or why there is none: `too_short` (no bucket it has the frames for)
        or `too_small` (every bucket it has the frames for needs more than `max_upscale` enlargement).

        `stride` overrides the table's for this clip (sampling at a target fps).
        """
        if width <= 0 or height <= 0 or num_frames <= 0:
            return "bad_metadata"
        stride = stride or self.stride
        image = num_frames == 1
        same_kind = [b for b in self.buckets if (b.frames == 1) == image] or list(self.buckets)
        fitting = [b for b in same_kind if (b.frames - 1) * stride + 1 <= num_frames]
        if not fitting:
            return "too_short"
        fitting = [b for b in fitting if max(b.width / width, b.height / height) <= max_upscale + 1e-9]
        if not fitting:
            return "too_small"
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


def bucket_table(buckets: str | None, num_frames: int, height: int, width: int, stride: int) -> BucketTable:
    """The table `buckets` names (see `load_bucket_table`), or when None the one bucket
    num_frames × height × width sampled `stride` frames apart (raises ValueError)."""
    if buckets is None:
        return BucketTable((Bucket(num_frames, height, width),), stride)
    return load_bucket_table(buckets)


def check_bucket_table(table: BucketTable, patch_size: Sequence[int] | None, images: bool) -> None:
    """Raise ValueError when a bucket's (frames, height, width) is not divisible by the model's
    `patch_size` (pass it for pixel space, where buckets are patched as they are; None skips the
    check), or when `images` are mixed in and the table has no 1-frame bucket to take them."""
    if patch_size is not None:
        for bucket in table.buckets:
            sides = (bucket.frames, bucket.height, bucket.width)
            if any(side % patch for side, patch in zip(sides, patch_size, strict=True)):
                raise ValueError(
                    f"bucket {bucket.name} is not divisible by model.patch_size={list(patch_size)}"
                )
    if images and not any(bucket.frames == 1 for bucket in table.buckets):
        raise ValueError("data.images needs a bucket table with 1-frame (image) buckets")


def bucket_table_from_dict(spec: dict) -> BucketTable:
    """A table from `{"stride": S, "buckets": [{"frames", "height", "width"}, ...]}`."""
    try:
        buckets = tuple(
            Bucket(
                int(b["frames"]), int(b["height"]), int(b["width"]),
                int(b["batch_size"]) if b.get("batch_size") is not None else None, float(b.get("weight", 1.0)),
            )
            for b in spec["buckets"]
        )  # fmt: skip
        return BucketTable(buckets, int(spec.get("stride", 1)))
    except (KeyError, TypeError) as error:
        raise ValueError(f"bad bucket table {spec!r}: {error}") from error


def batch_sizes_for(
    table: BucketTable, tokens_per_batch: int, tokens_of: Callable[[Bucket], int], default: int
) -> tuple[int, ...]:
    """Per-rank batch size of each bucket: the table's own, else `tokens_per_batch // tokens`, else `default`.

    Raises ValueError when a single sample of a bucket exceeds the token budget (it could only
    run out of memory where the budget was sized for the others).
    """
    sizes = []
    for bucket in table.buckets:
        if bucket.batch_size is not None:
            sizes.append(bucket.batch_size)
        elif tokens_per_batch > 0:
            tokens = tokens_of(bucket)
            if tokens > tokens_per_batch:
                raise ValueError(
                    f"bucket {bucket.name} has {tokens} tokens per sample, more than the budget of "
                    f"{tokens_per_batch} tokens per batch; raise the budget or drop the bucket"
                )
            sizes.append(tokens_per_batch // tokens)
        else:
            sizes.append(default)
    return tuple(sizes)
