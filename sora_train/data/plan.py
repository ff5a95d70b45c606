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


@dataclass(frozen=True)
class EpochPlan:
    """The batches of one epoch as three arrays, not one object per batch: batch i holds
    `samples[starts[i]:starts[i + 1]]`, all of bucket `buckets[i]`: 8 bytes per sample and 10 per
    batch."""

    source: int
    epoch: int
    samples: np.ndarray  # (kept samples,) int64 indices into the shard set's index, batch after batch
    starts: np.ndarray  # (batches + 1,) int64
    buckets: np.ndarray  # (batches,) int16

    def __len__(self) -> int:
        return len(self.buckets)

    def __getitem__(self, i: int) -> PlannedBatch:
        samples = self.samples[self.starts[i] : self.starts[i + 1]]
        return PlannedBatch(self.source, int(self.buckets[i]), samples, self.epoch)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def batch_order(
    buckets: np.ndarray, batch_sizes: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deal positions 0..N-1 of an epoch's order, whose buckets are `buckets` (N,), into batches.

    Each bucket fills batches of its size in order; a batch is emitted when it fills (at the
    position of its last sample), each bucket's last partial batch at the end, ordered by bucket.
    Returns (positions (N,) batch after batch, starts (batches + 1,), bucket of each batch)."""
    buckets = buckets.astype(np.int64)
    sizes = np.asarray(batch_sizes, np.int64)[buckets]  # (N,) the batch size of each position's bucket
    rank_in_bucket = np.zeros(len(buckets), np.int64)  # (N,) how many earlier positions share the bucket
    for bucket in np.unique(buckets):
        where = np.flatnonzero(buckets == bucket)
        rank_in_bucket[where] = np.arange(len(where))
    chunk = rank_in_bucket // sizes  # (N,) which of its bucket's batches a position is in
    counts = np.bincount(buckets, minlength=len(batch_sizes))  # per bucket
    full = (chunk + 1) * sizes <= counts[buckets]  # in a batch that fills
    last = full & ((rank_in_bucket + 1) % sizes == 0) | ~full & (rank_in_bucket + 1 == counts[buckets])
    done_at = np.where(full, np.arange(len(buckets)), len(buckets) + buckets)  # when its batch is emitted
    ends = np.flatnonzero(last)  # one position per batch: its last sample
    ends = ends[np.lexsort((buckets[ends], done_at[ends]))]  # in emission order: by time, then bucket
    batch_id = buckets * (len(buckets) + 1) + chunk  # (N,) names each position's batch
    by_id = np.argsort(batch_id[ends])
    emission = by_id[np.searchsorted(batch_id[ends], batch_id, sorter=by_id)]  # (N,) its batch's turn
    positions = np.lexsort((np.arange(len(buckets)), emission))  # batch after batch, in order within
    starts = np.concatenate([[0], np.cumsum(np.bincount(emission, minlength=len(ends)))])
    return positions, starts, buckets[ends].astype(np.int16)


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
    _plans: dict[int, EpochPlan] = field(default_factory=dict, repr=False)
    _epoch_starts: list[int] = field(default_factory=lambda: [0], repr=False)
    _lock: threading.RLock = field(
        default_factory=threading.RLock, repr=False
    )  # the prefetch thread plans too

    def __post_init__(self):
        if not (self.bucket_of >= 0).any():
            raise ValueError("no usable sample: every sample was rejected")
        num_shards = int(self.shard_of.max()) + 1 if len(self.shard_of) else 0
        self._shard_bounds = np.searchsorted(self.shard_of, np.arange(num_shards + 1))

    def epoch(self, epoch: int) -> EpochPlan:
        """The batches of one epoch, in order (cached for the two most recent epochs)."""
        with self._lock:
            if epoch not in self._plans:
                self._plans[epoch] = self._plan(epoch)
                for old in sorted(self._plans)[:-2]:
                    del self._plans[old]
            return self._plans[epoch]

    def _kept(self, epoch: int) -> tuple[np.ndarray, np.random.Generator]:
        """The epoch's kept samples in shard order (shards permuted), and the generator after it."""
        rng = np.random.default_rng([self.seed, self.source, epoch])
        bounds = self._shard_bounds
        shards = rng.permutation(len(bounds) - 1)
        order = np.concatenate([np.arange(bounds[s], bounds[s + 1]) for s in shards])  # (N,)
        buckets = self.bucket_of[order]
        keep_probability = np.asarray(self.weights) / max(self.weights)
        draws = rng.random(len(order))
        usable = buckets >= 0
        keep = usable & (draws < keep_probability[np.where(usable, buckets, 0)])
        return order[keep], rng

    def epoch_length(self, epoch: int) -> int:
        """Batches in `epoch`, without planning it: the same for every epoch when every bucket keeps
        all its samples, else counted from the epoch's keep draws (a fraction of planning it)."""
        if epoch in self._plans:
            return len(self._plans[epoch])
        if min(self.weights) == max(self.weights):
            kept = self.bucket_of[self.bucket_of >= 0]
        else:
            kept = self.bucket_of[self._kept(epoch)[0]]
        counts = np.bincount(kept, minlength=len(self.batch_sizes))
        return int(sum(-(-int(n) // size) for n, size in zip(counts, self.batch_sizes, strict=True)))

    def _plan(self, epoch: int) -> EpochPlan:
        order, rng = self._kept(epoch)
        for first in range(0, len(order), self.window):
            block = order[first : first + self.window]
            order[first : first + self.window] = block[rng.permutation(len(block))]
        positions, starts, batch_buckets = batch_order(self.bucket_of[order], self.batch_sizes)
        return EpochPlan(self.source, epoch, order[positions].astype(np.int64), starts, batch_buckets)

    def batch(self, position: int) -> PlannedBatch:
        """The `position`-th batch of this set's endless sequence of epochs."""
        with self._lock:
            while position >= self._epoch_starts[-1]:  # earlier epochs are counted, not planned
                epoch = len(self._epoch_starts) - 1
                self._epoch_starts.append(self._epoch_starts[-1] + self.epoch_length(epoch))
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
