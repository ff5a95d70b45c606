"""The epoch plan as arrays deals exactly the batches the one-object-per-batch plan dealt."""

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


def test_an_epoch_of_a_million_samples_at_batch_size_one_is_18_bytes_per_sample():
    n = 1_000_000
    planner = EpochPlanner(
        0, np.repeat(np.arange(1000), n // 1000), np.zeros(n, np.int16), (1,), (1.0,), 0, 256
    )
    plan = planner.epoch(0)
    assert len(plan) == n and len(plan[n - 1].samples) == 1
    assert plan.samples.nbytes + plan.starts.nbytes + plan.buckets.nbytes == 8 * n + 8 * (n + 1) + 2 * n
    assert sorted(plan.samples.tolist()) == list(range(n))  # every sample once


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (1.0, 0.5, 0.25)])
def test_epochs_are_counted_without_planning_them_and_a_late_batch_plans_only_its_epoch(weights):
    rng = np.random.default_rng(3)
    buckets = rng.integers(-1, 3, size=500).astype(np.int16)  # -1: rejected
    planner = EpochPlanner(0, np.repeat(np.arange(20), 25), buckets, (2, 3, 5), weights, 11, 16)
    reference = EpochPlanner(0, np.repeat(np.arange(20), 25), buckets, (2, 3, 5), weights, 11, 16)
    lengths = [len(reference.epoch(e)) for e in range(6)]
    assert [planner.epoch_length(e) for e in range(6)] == lengths
    position = sum(lengths[:5]) + 7  # the 8th batch of epoch 5
    late = planner.batch(position)
    assert sorted(planner._plans) == [5]  # epochs 0-4 were counted, not planned
    expected = reference.epoch(5)[7]
    assert (late.epoch, late.bucket, late.samples.tolist()) == (5, expected.bucket, expected.samples.tolist())
