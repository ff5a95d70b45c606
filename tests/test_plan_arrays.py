"""The epoch plan as arrays, a block at a time: the batches the one-batch-at-a-time rule deals,
lengths known without planning, and a seek to any epoch that plans only the block it lands in."""

from __future__ import annotations

import numpy as np
import pytest

from sora_train.data.plan import EpochPlanner, batch_order


def reference_batches(buckets: np.ndarray, batch_sizes: tuple[int, ...]) -> list[tuple[int, list[int]]]:
    """The rule, one batch at a time: each bucket fills its own batches in order; a batch is
    emitted when full, each bucket's partial batch at the end, by bucket."""
    pending = []
    for bucket, size in enumerate(batch_sizes):
        positions = np.flatnonzero(buckets == bucket)
        for first in range(0, len(positions), size):
            chunk = positions[first : first + size]
            done_at = int(chunk[-1]) if len(chunk) == size else len(buckets) + bucket
            pending.append((done_at, bucket, chunk.tolist()))
    pending.sort(key=lambda item: (item[0], item[1]))
    return [(bucket, chunk) for _, bucket, chunk in pending]


def epoch_batches(planner: EpochPlanner, epoch: int) -> list:
    """Every batch of an epoch, block after block."""
    return [batch for block in range(planner.blocks) for batch in planner.plan_block(epoch, block)]


def ragged_planner(seed: int, weights: tuple[float, ...], block_positions: int) -> EpochPlanner:
    """30 shards of 0-60 samples, a tenth rejected, 3 buckets."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 60, size=30)
    buckets = rng.integers(-1, 3, size=int(sizes.sum())).astype(np.int16)
    buckets[rng.random(len(buckets)) < 0.15] = -1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return EpochPlanner(
        0, bounds, buckets, (2, 3, 5), weights, seed, window=8, block_positions=block_positions
    )


@pytest.mark.parametrize("seed", range(20))
def test_array_dealing_equals_the_one_batch_at_a_time_rule(seed):
    rng = np.random.default_rng(seed)
    sizes = tuple(int(n) for n in rng.integers(1, 6, size=int(rng.integers(1, 5))))
    buckets = rng.integers(0, len(sizes), size=int(rng.integers(0, 200))).astype(np.int16)
    positions, starts, batch_buckets = batch_order(buckets, sizes)
    dealt = [
        (int(batch_buckets[i]), positions[starts[i] : starts[i + 1]].tolist())
        for i in range(len(batch_buckets))
    ]
    assert dealt == reference_batches(buckets, sizes)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (1.0, 0.5, 0.25)])
@pytest.mark.parametrize("seed", range(8))
def test_block_lengths_known_from_shard_counts_equal_the_planned_blocks(seed, weights):
    """Each block's batch count, computed from per-shard bucket counts and one draw per bucket,
    is the number of batches planning the block gives; an epoch keeps each sample at most once,
    every usable one when no bucket is down-weighted, and a weighted bucket keeps its fraction of
    each block's samples, rounded down or up."""
    planner = ragged_planner(seed, weights, block_positions=64)
    usable = np.flatnonzero(planner.bucket_of >= 0)
    assert planner.blocks == -(-len(planner.bucket_of) // 64)
    for epoch in range(3):
        layout = planner.layout(epoch)
        plans = [planner.plan_block(epoch, block) for block in range(planner.blocks)]
        assert np.diff(layout).tolist() == [len(plan) for plan in plans]
        kept = np.concatenate([plan.samples for plan in plans])
        assert len(set(kept.tolist())) == len(kept)
        assert all(len(b.samples) <= (2, 3, 5)[b.bucket] for plan in plans for b in plan)
        assert all((planner.bucket_of[b.samples] == b.bucket).all() for plan in plans for b in plan)
        if weights == (1.0, 1.0, 1.0):
            assert sorted(kept.tolist()) == usable.tolist()
        for block, plan in enumerate(plans):
            quota = planner._quota(epoch, block)[0]
            counts = np.bincount(planner.bucket_of[plan.samples], minlength=3)
            assert (counts == quota).all()


def test_batches_come_from_the_block_planned_ahead_as_if_planned_on_demand():
    """Planning the next block in the background changes nothing: the batch sequence equals the
    blocks planned one by one, across blocks and epochs."""
    planner, reference = (ragged_planner(5, (1.0, 0.5, 0.25), block_positions=64) for _ in range(2))
    expected = [b for epoch in range(3) for b in epoch_batches(reference, epoch)]
    got = [planner.batch(position) for position in range(len(expected))]
    assert [(b.epoch, b.bucket, b.samples.tolist()) for b in got] == [
        (b.epoch, b.bucket, b.samples.tolist()) for b in expected
    ]


def test_three_million_samples_at_batch_size_one_cost_one_block_of_memory():
    """3M samples over 3000 shards: every sample once per epoch, planned in blocks of 2^20 positions
    whose arrays take 18 bytes per sample of the block."""
    n = 3_000_000
    bounds = np.arange(0, n + 1, 1000)
    planner = EpochPlanner(0, bounds, np.zeros(n, np.int16), (1,), (1.0,), 0, 256)
    assert planner.blocks == 3 and planner.epoch_length(0) == n
    seen = np.zeros(n, np.int64)
    for block in range(planner.blocks):
        plan = planner.plan_block(0, block)
        assert plan.samples.nbytes + plan.starts.nbytes + plan.buckets.nbytes == 18 * len(plan) + 8
        seen[plan.samples] += 1
    assert (seen == 1).all()


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (1.0, 0.5, 0.25)])
def test_a_late_batch_counts_earlier_epochs_and_plans_only_its_block(weights):
    planner = ragged_planner(3, weights, block_positions=64)
    reference = ragged_planner(3, weights, block_positions=64)
    lengths = [len(epoch_batches(reference, e)) for e in range(6)]
    assert [planner.epoch_length(e) for e in range(6)] == lengths
    position = sum(lengths[:5]) + lengths[5] // 2  # the middle of epoch 5
    late = planner.batch(position)
    block = int(np.searchsorted(planner.layout(5), lengths[5] // 2, "right")) - 1
    assert sorted(planner._plans) == sorted({(5, block), planner._next_block(5, block)})
    expected = epoch_batches(reference, 5)[lengths[5] // 2]
    assert (late.epoch, late.bucket, late.samples.tolist()) == (5, expected.bucket, expected.samples.tolist())
