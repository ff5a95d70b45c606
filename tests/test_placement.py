"""Placing a shard's samples once per distinct shape gives every sample the bucket, or the reason,
that placing it alone gives."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from sora_train.data.buckets import Bucket, BucketTable
from sora_train.data.decode import clip_stride
from sora_train.data.placement import Placer
from sora_train.data.sample_index import KINDS, RECORD, SampleIndex

TABLE = BucketTable(
    (
        *(Bucket(f, h, w) for f in (9, 17, 33) for h, w in ((256, 448), (448, 256), (320, 320))),
        Bucket(1, 256, 256),
        Bucket(5, 128, 224, weight=0.5),
    ),
    stride=2,
)
LATENT_NAMES = ("17x256x448", "9x320x320", "3x8x8")  # the last is in no table: wrong_bucket


def random_shard(rng: np.random.Generator, n: int) -> SampleIndex:
    """n records: videos of a few common and some odd shapes, images, and latents."""
    records = np.zeros(n, RECORD)
    common = np.array([(1280, 720), (720, 1280), (640, 640), (854, 480), (200, 120), (4000, 100)])
    pick = rng.integers(0, len(common), n)
    odd = rng.random(n) < 0.2
    records["width"] = np.where(odd, rng.integers(1, 5000, n), common[pick, 0])
    records["height"] = np.where(odd, rng.integers(1, 5000, n), common[pick, 1])
    records["frames"] = np.where(rng.random(n) < 0.1, 1, rng.integers(1, 120, n))
    records["fps"] = rng.choice([0.0, 12.0, 23.976, 24.0, 25.0, 29.97, 30.0, 36.0, 60.0, 120.0], n)
    records["kind"] = np.where(records["frames"] == 1, KINDS.index("image"), KINDS.index("video"))
    latent = rng.random(n) < 0.1
    records["kind"][latent] = KINDS.index("latent")
    records["latent_bucket"] = np.where(latent, rng.integers(0, len(LATENT_NAMES), n), -1)
    return SampleIndex(10**9, records, {}, 0, 0, None, LATENT_NAMES)


def placed_alone(record: np.void, target_fps: float | None, max_upscale: float) -> int | str:
    if KINDS[record["kind"]] == "latent":
        name = LATENT_NAMES[record["latent_bucket"]]
        return TABLE.index(name) if name in [b.name for b in TABLE.buckets] else "wrong_bucket"
    stride = clip_stride(float(record["fps"]), target_fps, TABLE.stride)
    placed = TABLE.place(
        int(record["width"]), int(record["height"]), int(record["frames"]), stride, max_upscale
    )
    return placed if isinstance(placed, str) else TABLE.buckets.index(placed)


@pytest.mark.parametrize("target_fps", [None, 8.0, 12.0, 24.0])
@pytest.mark.parametrize("max_upscale", [float("inf"), 1.5])
def test_placing_by_shape_equals_placing_each_sample(target_fps, max_upscale):
    rng = np.random.default_rng(int(target_fps or 0) * 7 + int(max_upscale == 1.5))
    placer = Placer(TABLE, target_fps, max_upscale)
    rejected: Counter = Counter()
    shards = [random_shard(rng, 700) for _ in range(3)]  # the placer's memory carries across shards
    got = np.concatenate([placer.place(shard, rejected) for shard in shards])
    expected = [placed_alone(r, target_fps, max_upscale) for shard in shards for r in shard.records]
    assert got.tolist() == [e if isinstance(e, int) else -1 for e in expected]
    assert rejected == Counter(e for e in expected if isinstance(e, str))
    assert {"too_short", "wrong_bucket"} <= set(rejected)
