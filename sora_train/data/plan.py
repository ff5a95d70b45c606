"""Which samples form which batch, in which order, on which rank: a pure function of the seed.

The loader never decides anything while streaming; it reads this plan.

1. An epoch of one shard set (`EpochPlanner`): shards in a seeded order, samples in file order
   within each, shuffled inside consecutive windows of `window` samples; a bucket with a lower
   weight keeps a seeded fraction of its samples. Walking that order, each bucket fills its own
   batch; a batch is emitted when full, and each bucket's last partial batch at the end of the
   epoch, so an epoch covers every kept sample exactly once.
2. Shard sets are mixed batch by batch (`Mixture`): with an image ratio rho, global batch g
   comes from the image set when floor((g+1)·rho) > floor(g·rho). Each set runs through its
   own epochs, back to back, for ever.
3. Ranks share that one global sequence (`RankCursor`): from a start position, skipping
   positions already consumed, rank r of W takes every W-th batch starting at r. Nothing in the
   sequence depends on the number of ranks or workers, so after a resume with other numbers the
   remaining batches are simply dealt again: no batch is repeated or lost.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class PlannedBatch:
    """One batch: samples (indices into a shard set's index) of one bucket."""

    source: int
    bucket: int
    samples: np.ndarray
    epoch: int


@dataclass
class EpochPlanner:
    """The epochs of one shard set. `bucket_of` is (N,) bucket per sample, -1 for rejected."""

    source: int
    shard_of: np.ndarray
    bucket_of: np.ndarray
    batch_sizes: tuple[int, ...]
    weights: tuple[float, ...]
    seed: int
    window: int
    _plans: dict[int, list[PlannedBatch]] = field(default_factory=dict, repr=False)
    _epoch_starts: list[int] = field(default_factory=lambda: [0], repr=False)
    _lock: threading.RLock = field(
        default_factory=threading.RLock, repr=False
    )  # the prefetch thread plans too

    def __post_init__(self):
        if not (self.bucket_of >= 0).any():
            raise ValueError("no usable sample: every sample was rejected")
        num_shards = int(self.shard_of.max()) + 1 if len(self.shard_of) else 0
        self._shard_bounds = np.searchsorted(self.shard_of, np.arange(num_shards + 1))

    def epoch(self, epoch: int) -> list[PlannedBatch]:
        """The batches of one epoch, in order (cached for the two most recent epochs)."""
        with self._lock:
            if epoch not in self._plans:
                self._plans[epoch] = self._plan(epoch)
                for old in sorted(self._plans)[:-2]:
                    del self._plans[old]
            return self._plans[epoch]

    def _plan(self, epoch: int) -> list[PlannedBatch]:
        rng = np.random.default_rng([self.seed, self.source, epoch])
        bounds = self._shard_bounds
        shards = rng.permutation(len(bounds) - 1)
        order = np.concatenate([np.arange(bounds[s], bounds[s + 1]) for s in shards])  # (N,)
        buckets = self.bucket_of[order]
        keep_probability = np.asarray(self.weights) / max(self.weights)
        draws = rng.random(len(order))
        usable = buckets >= 0
        keep = usable & (draws < keep_probability[np.where(usable, buckets, 0)])
        order = order[keep]
        for first in range(0, len(order), self.window):
            block = order[first : first + self.window]
            order[first : first + self.window] = block[rng.permutation(len(block))]
        buckets = self.bucket_of[order]
        pending: list[tuple[int, int, PlannedBatch]] = []  # (completed at, bucket, batch)
        for bucket, size in enumerate(self.batch_sizes):
            positions = np.flatnonzero(buckets == bucket)
            for first in range(0, len(positions), size):
                chunk = positions[first : first + size]
                done_at = int(chunk[-1]) if len(chunk) == size else len(order) + bucket
                pending.append((done_at, bucket, PlannedBatch(self.source, bucket, order[chunk], epoch)))
        pending.sort(key=lambda item: (item[0], item[1]))
        return [batch for _, _, batch in pending]

    def batch(self, position: int) -> PlannedBatch:
        """The `position`-th batch of this set's endless sequence of epochs."""
        with self._lock:
            while position >= self._epoch_starts[-1]:
                epoch = len(self._epoch_starts) - 1
                self._epoch_starts.append(self._epoch_starts[-1] + len(self.epoch(epoch)))
            epoch = bisect.bisect_right(self._epoch_starts, position) - 1
            return self.epoch(epoch)[position - self._epoch_starts[epoch]]


@dataclass
class Mixture:
    """Global batch g -> (shard set, position in its sequence); set 1 (images) takes `ratio` of the batches."""

    planners: list[EpochPlanner]
    ratio: float = 0.0

    def __post_init__(self):
        if len(self.planners) == 2 and not 0.0 < self.ratio < 1.0:
            raise ValueError(f"an image/video mixture needs 0 < image_ratio < 1, got {self.ratio}")

    def locate(self, g: int) -> tuple[int, int]:
        """(set, position within the set's sequence) of global batch g."""
        if len(self.planners) == 1:
            return 0, g
        before = int(np.floor(g * self.ratio))  # image batches among the first g
        if int(np.floor((g + 1) * self.ratio)) > before:
            return 1, before
        return 0, g - before

    def batch(self, g: int) -> PlannedBatch:
        """Global batch g."""
        source, position = self.locate(g)
        return self.planners[source].batch(position)


@dataclass
class RankCursor:
    """This rank's place in the global batch sequence.

    Global positions below `start` and those in `done` are consumed; the rest, in order, are
    dealt round-robin over `world` ranks; this rank has taken the first `taken` of its share.
    """

    start: int = 0
    done: tuple[int, ...] = ()
    world: int = 1
    rank: int = 0
    taken: int = 0

    def free_position(self, p: int) -> int:
        """The p-th unconsumed global position at or after `start`."""
        position = self.start + p
        for consumed in self.done:  # sorted, and few: only batches taken ahead of a slower rank
            if consumed <= position:
                position += 1
            else:
                break
        return position

    def position(self, j: int) -> int:
        """Global position of this rank's j-th batch."""
        return self.free_position(self.rank + j * self.world)

    def state(self) -> dict:
        """Plain-type state (saved in checkpoints)."""
        return {
            "start": self.start,
            "done": list(self.done),
            "world": self.world,
            "rank": self.rank,
            "taken": self.taken,
        }


def merge_cursors(states: list[dict]) -> RankCursor:
    """The consumed set of every rank of a run, as a new start (taken = 0, world and rank unset).

    `states` are all ranks' `RankCursor.state()` from one checkpoint. Free positions below the
    earliest unconsumed one of any rank become the new start; positions taken beyond it by
    faster ranks are listed in `done`.
    """
    if not states:
        raise ValueError("no loader state to merge")
    first = RankCursor(**states[0])
    world = first.world
    if sorted(s["rank"] for s in states) != list(range(world)) or any(
        (s["start"], list(s["done"]), s["world"]) != (first.start, list(first.done), world) for s in states
    ):
        raise ValueError("loader states do not come from one checkpoint of one run (ranks or starts differ)")
    boundary = min(s["rank"] + s["taken"] * world for s in states)  # free positions below it are consumed
    ahead = sorted(
        first.free_position(s["rank"] + j * world)
        for s in states
        for j in range(s["taken"])
        if s["rank"] + j * world >= boundary
    )
    start = first.free_position(boundary)
    done = sorted({d for d in first.done if d > start} | set(ahead))
    return RankCursor(start=start, done=tuple(done))
