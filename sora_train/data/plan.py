"""Which samples form which batch, in which order, on which rank: a pure function of the seed.

The loader never decides anything while streaming; it reads this plan.

1. An epoch of one shard set (`EpochPlanner`): shards in a seeded order, samples in file order
   within each, cut into blocks of about a million positions, each planned on its own: samples
   shuffled inside consecutive windows of `window` samples; a bucket with a lower weight keeps a
   seeded fraction of its samples. Walking that order, each bucket fills its own batch; a batch
   is emitted when full, and each bucket's last partial batch at the end of the block, so an
   epoch covers every kept sample exactly once.
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
from concurrent.futures import Future, ThreadPoolExecutor
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
class BlockPlan:
    """The batches of one block of an epoch as three arrays, not one object per batch: batch i
    holds `samples[starts[i]:starts[i + 1]]`, all of bucket `buckets[i]`."""

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
    """Deal positions 0..N-1 of a block's order, whose buckets are `buckets` (N,), into batches.

    Each bucket fills batches of its size in order; a batch is emitted when it fills (at the
    position of its last sample), each bucket's last partial batch at the end, ordered by bucket.
    Returns (positions (N,) batch after batch, starts (batches + 1,), bucket of each batch)."""
    buckets = buckets.astype(np.int64)
    sizes = np.asarray(batch_sizes, np.int64)[buckets]  # (N,) the batch size of each position's bucket
    rank_in_bucket = rank_within_groups(
        buckets, np.arange(len(buckets))
    )  # (N,) earlier positions of its bucket
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


def rank_within_groups(groups: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """(N,) how many members of each element's group come before it when ordered by `keys`."""
    order = np.lexsort((keys, groups))
    sorted_groups = groups[order]
    ranks = np.empty(len(groups), np.int64)
    ranks[order] = np.arange(len(groups)) - np.searchsorted(sorted_groups, sorted_groups, "left")
    return ranks


BLOCK_POSITIONS = 1 << 20  # positions of an epoch's order planned together (rounded to whole windows)
PLANS_KEPT = 4  # block plans kept: the current one, the next (planned ahead), and two before


@dataclass
class EpochPlanner:
    """The epochs of one shard set, planned a block at a time.

    An epoch's order: shards in a seeded permutation, samples in file order within each. The order
    is cut into blocks of `block_positions` positions (whole shuffle windows), and each block is
    planned on its own: samples shuffled inside windows of `window` positions; a bucket whose
    weight is below the largest keeps a seeded choice of that fraction of its samples in the block
    (rounded up or down at random, so the expected fraction is exact); then each bucket fills its
    own batches, a batch emitted when full and the bucket's last partial batch at the end of the
    block. An epoch covers every kept sample exactly once.

    How many batches each block holds follows from per-shard bucket counts alone, so any epoch's
    length, and where any batch of it lies, is found without planning anything: seeking to epoch
    5 costs what seeking to epoch 0 does. Memory is the (N,) int16 bucket of each sample plus a
    few arrays of one block; the block after the one in use is planned in a background thread.
    """

    source: int
    shard_bounds: np.ndarray  # (shards + 1,) shard s holds samples shard_bounds[s]:shard_bounds[s + 1]
    bucket_of: np.ndarray  # (N,) bucket per sample, -1 for rejected
    batch_sizes: tuple[int, ...]
    weights: tuple[float, ...]
    seed: int
    window: int
    block_positions: int = BLOCK_POSITIONS
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def __post_init__(self):
        if not (self.bucket_of >= 0).any():
            raise ValueError("no usable sample: every sample was rejected")
        self.block = self.window * max(1, round(self.block_positions / self.window))
        self.blocks = max(1, -(-len(self.bucket_of) // self.block))  # per epoch
        self.keep = np.asarray(self.weights, np.float64) / max(self.weights)  # (B,) fraction kept
        self._sizes = np.diff(self.shard_bounds)
        self.shard_counts = np.stack(  # (shards, B) usable samples of each bucket in each shard
            [
                self._bucket_counts(lo, hi)
                for lo, hi in zip(self.shard_bounds[:-1], self.shard_bounds[1:], strict=True)
            ]
            or [np.zeros(len(self.batch_sizes), np.int64)]
        )
        self._layouts: dict[int, np.ndarray] = {}  # epoch -> (blocks + 1,) first batch of each block
        self._epoch_starts = [0]
        self._plans: dict[tuple[int, int], Future] = {}
        self._planning = ThreadPoolExecutor(1, thread_name_prefix=f"plan-{self.source}")

    def _bucket_counts(self, first: int, stop: int) -> np.ndarray:
        """(B,) usable samples of each bucket among samples first..stop-1."""
        return np.bincount(self.bucket_of[first:stop] + 1, minlength=len(self.batch_sizes) + 1)[1:]

    def _shard_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(the epoch's shard permutation, the order position where each of its shards ends)."""
        shards = np.random.default_rng([self.seed, self.source, epoch]).permutation(len(self._sizes))
        return shards, np.cumsum(self._sizes[shards])

    def _pieces(self, epoch: int, block: int) -> list[tuple[int, int, int]]:
        """(shard, first sample, stop) of each run of samples in one block of the epoch's order."""
        shards, ends = self._shard_order(epoch)
        first, stop = block * self.block, min((block + 1) * self.block, len(self.bucket_of))
        pieces = []
        for j in range(
            int(np.searchsorted(ends, first, "right")), int(np.searchsorted(ends, stop, "left")) + 1
        ):
            shard = int(shards[j])
            begins = int(ends[j]) - int(self._sizes[shard])  # the order position of its first sample
            lo, hi = max(first, begins) - begins, min(stop, int(ends[j])) - begins
            if lo < hi:
                pieces.append((shard, int(self.shard_bounds[shard]) + lo, int(self.shard_bounds[shard]) + hi))
        return pieces

    def _quota(self, epoch: int, block: int) -> tuple[np.ndarray, np.random.Generator]:
        """(B,) samples each bucket keeps in the block, and the block's generator after drawing it."""
        counts = np.zeros(len(self.batch_sizes), np.int64)
        for shard, lo, hi in self._pieces(epoch, block):
            counts += (
                self.shard_counts[shard] if hi - lo == self._sizes[shard] else self._bucket_counts(lo, hi)
            )
        rng = np.random.default_rng([self.seed, self.source, epoch, block])
        kept = np.floor(counts * self.keep + rng.random(len(counts))).astype(np.int64)
        return np.minimum(kept, counts), rng

    def layout(self, epoch: int) -> np.ndarray:
        """(blocks + 1,) the epoch's first batch of each block, then its number of batches."""
        with self._lock:
            layout = self._layouts.pop(epoch, None)
            if layout is None:
                sizes = np.asarray(self.batch_sizes, np.int64)
                batches = [int((-(-self._quota(epoch, k)[0] // sizes)).sum()) for k in range(self.blocks)]
                layout = np.concatenate([[0], np.cumsum(batches, dtype=np.int64)])
            self._layouts[epoch] = layout  # the most recently used last
            while len(self._layouts) > 2:
                del self._layouts[next(iter(self._layouts))]
            return layout

    def epoch_length(self, epoch: int) -> int:
        """Batches in `epoch`, without planning it."""
        return int(self.layout(epoch)[-1])

    def plan_block(self, epoch: int, block: int) -> BlockPlan:
        """The batches of one block of an epoch, in order."""
        kept, rng = self._quota(epoch, block)
        samples = np.concatenate([np.arange(lo, hi) for _, lo, hi in self._pieces(epoch, block)])  # (P,)
        buckets = self.bucket_of[samples].astype(np.int64)
        choice = rank_within_groups(buckets, rng.random(len(samples)))  # (P,) a seeded rank in its bucket
        keep = (buckets >= 0) & (choice < kept[np.maximum(buckets, 0)])
        shuffled = np.lexsort((rng.random(len(samples)), np.arange(len(samples)) // self.window))
        samples = samples[shuffled][keep[shuffled]]  # kept samples, shuffled inside their windows
        positions, starts, batch_buckets = batch_order(self.bucket_of[samples], self.batch_sizes)
        return BlockPlan(self.source, epoch, samples[positions].astype(np.int64), starts, batch_buckets)

    def _next_block(self, epoch: int, block: int) -> tuple[int, int]:
        return (epoch, block + 1) if block + 1 < self.blocks else (epoch + 1, 0)

    def block_plan(self, epoch: int, block: int) -> BlockPlan:
        """The plan of one block (kept for the next batches), with the block after it planned ahead."""
        with self._lock:
            for key in ((epoch, block), self._next_block(epoch, block)):
                if key not in self._plans:
                    self._plans[key] = self._planning.submit(self.plan_block, *key)
            for old in list(self._plans)[:-PLANS_KEPT]:
                if old != (epoch, block):
                    del self._plans[old]
            pending = self._plans[(epoch, block)]
        return pending.result()

    def batch(self, position: int) -> PlannedBatch:
        """The `position`-th batch of this set's endless sequence of epochs."""
        with self._lock:
            while position >= self._epoch_starts[-1]:  # earlier epochs are counted, not planned
                self._epoch_starts.append(
                    self._epoch_starts[-1] + self.epoch_length(len(self._epoch_starts) - 1)
                )
            epoch = bisect.bisect_right(self._epoch_starts, position) - 1
            offset = position - self._epoch_starts[epoch]
            layout = self.layout(epoch)
        block = int(np.searchsorted(layout, offset, "right")) - 1
        return self.block_plan(epoch, block)[offset - int(layout[block])]


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
