"""Corpus statistics for manifests and `sora-prep inspect`: totals, histograms, bucket counts.

Statistics are built from one small record per sample, `[width, height, num_frames, fps]`,
which shard indexes keep, so a resumed run and `inspect` rebuild them without decoding anything.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from sora_train.data.buckets import BucketTable

RESOLUTION_CLASSES = (144, 240, 360, 480, 720, 1080, 1440, 2160)  # by the shorter side
DURATION_EDGES = (1, 2, 4, 8, 16, 32, 64, 128)  # seconds


def resolution_class(width: int, height: int) -> str:
    """`720p`-style label of the largest class the shorter side reaches (`<144p` below all)."""
    short = min(width, height)
    reached = [c for c in RESOLUTION_CLASSES if short >= c]
    return f"{reached[-1]}p" if reached else f"<{RESOLUTION_CLASSES[0]}p"


def duration_bin(seconds: float) -> str:
    """`4-8s`-style label of the power-of-two bin holding `seconds`."""
    lower = 0
    for edge in DURATION_EDGES:
        if seconds < edge:
            return f"{lower}-{edge}s"
        lower = edge
    return f">={DURATION_EDGES[-1]}s"


@dataclass
class CorpusStats:
    """Running totals and histograms over samples (and, given a table, their buckets)."""

    buckets: BucketTable | None = None
    samples: int = 0
    frames: int = 0
    seconds: float = 0.0
    aspect_ratio: Counter = field(default_factory=Counter)
    resolution: Counter = field(default_factory=Counter)
    duration: Counter = field(default_factory=Counter)
    bucket_counts: Counter = field(default_factory=Counter)

    def add(self, record: list) -> None:
        """Count one sample described by `[width, height, num_frames, fps]`."""
        width, height, num_frames, fps = record
        seconds = num_frames / fps
        self.samples += 1
        self.frames += num_frames
        self.seconds += seconds
        self.aspect_ratio[f"{width / height:.2f}"] += 1
        self.resolution[resolution_class(width, height)] += 1
        self.duration[duration_bin(seconds)] += 1
        if self.buckets is not None:
            bucket = self.buckets.assign(width, height, num_frames)
            self.bucket_counts[bucket.name if bucket else "none (too short for every bucket)"] += 1

    def to_dict(self) -> dict:
        """The statistics as JSON-ready data (histograms sorted by label)."""
        stats = {
            "samples": self.samples,
            "frames": self.frames,
            "hours": round(self.seconds / 3600, 4),
            "histograms": {
                "aspect_ratio": dict(sorted(self.aspect_ratio.items())),
                "resolution": dict(sorted(self.resolution.items())),
                "duration": dict(sorted(self.duration.items())),
            },
        }
        if self.buckets is not None:
            stats["buckets"] = {
                "stride": self.buckets.stride,
                "counts": {b.name: self.bucket_counts.get(b.name, 0) for b in self.buckets.buckets}
                | {k: v for k, v in self.bucket_counts.items() if k.startswith("none")},
            }
        return stats
