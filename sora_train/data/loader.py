"""The training loader: bucketed, shape-homogeneous batches with exact and elastic resume.

At start each rank indexes its shard sets (cached; metadata only), places every sample in a
bucket, and builds the plan of `plan.py`: the global sequence of batches is a pure function of
the seed, and this rank takes its share of it. Iterating reads the planned samples by byte range
and decodes them in supervised worker processes, with the decoder `data.decoder` names (resolved
once at start, where an unusable one is an error). A decode that hangs costs `decode_timeout` and
a counted `timeout` skip, one that crashes a counted `decoder_crash`; workers are recycled every
`worker_max_tasks` samples so native decoder leaks stay bounded. A sample that cannot be used
is counted by reason and its batch is smaller; a batch with no usable sample is passed over.

`state_dict()` is this rank's cursor. At the same number of ranks, `load_state_dict()` continues
the exact batch sequence, skipping consumed batches without reading them; with another number
of ranks, `merge_loader_states()` of every old rank's state gives a start from which the
remaining batches are dealt again, so no batch of the epoch is repeated or lost.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import queue
import threading
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .buckets import BucketTable
from .decode import DecoderName, resolve_decoder
from .index import ShardSetIndex, shard_indexes
from .placement import Placer
from .plan import EpochPlanner, Mixture, PlannedBatch, RankCursor, merge_cursors
from .samples import Example, SampleSettings, SampleTask, load_example, single_threaded
from .storage import ShardError
from .supervised import supervised_map

Batch = dict[str, Any]
STATE_VERSION = 2
PLAN_VERSION = 2  # the planning rule (plan.py); a state saved under another cannot be continued


@dataclass(frozen=True)
class LoaderSettings:
    """How a run reads its data. Batch sizes are per rank and per bucket (same order as the table)."""

    table: BucketTable
    batch_sizes: tuple[int, ...]
    seed: int = 0
    shuffle_window: int = 1000  # samples shuffled together, after a seeded shard order
    window: str = "random"  # where a clip is cut from its video: random | center
    decoder: DecoderName = "auto"  # auto: decord where installed, else torchcodec, else PyAV
    target_fps: float | None = None  # None: the table's frame stride for every video
    max_upscale: float = math.inf  # a bucket needing more enlargement than this is not a candidate
    latent_shapes: tuple[tuple[int, int, int, int], ...] | None = None  # per bucket: latent shards
    image_ratio: float = 0.0  # fraction of batches from the second shard set (images)
    num_workers: int = 0  # decode processes; 0 decodes in this process (no hang protection)
    decode_timeout: float = 60.0
    worker_max_tasks: int | None = 2000
    prefetch_batches: int = 2
    cache_dir: Path | None = None


def merge_counts(counts: list[dict[str, int]]) -> dict[str, int]:
    """Sum counters such as skipped samples by reason (over ranks)."""
    total: Counter = Counter()
    for count in counts:
        total.update(count)
    return dict(total)


def merge_loader_states(states: list[dict]) -> dict:
    """One state from every rank's `state_dict()` of a checkpoint, to resume with any number of ranks."""
    plans = {state["plan"] for state in states}
    if len(plans) != 1:
        raise ValueError("loader states come from different data plans")
    cursor = merge_cursors([state["cursor"] for state in states])
    return {
        "version": STATE_VERSION,
        "plan": plans.pop(),
        "cursor": {"start": cursor.start, "done": list(cursor.done)},
        "skipped": merge_counts([state["skipped"] for state in states]),
    }


def collate(examples: list[Example], planned: PlannedBatch, bucket_name: str) -> Batch:
    """Stack examples of one bucket: x (B, C, F, H, W), caption, key, bucket, source, epoch.

    x keeps the stored dtype: uint8 pixels (a quarter of float32's bytes to move; the trainer maps
    them to [-1, 1] on the device) or the latents' float dtype. With precomputed caption
    embeddings on every example, also text (B, T, E) float32 and text_mask (B, T) bool.
    """
    batch = {
        "x": torch.from_numpy(np.stack([example.x for example in examples])),
        "caption": [example.caption for example in examples],
        "key": [example.key for example in examples],
        "bucket": bucket_name,
        "source": planned.source,
        "epoch": planned.epoch,
    }
    if all(example.text is not None for example in examples):
        batch["text"] = torch.from_numpy(np.stack([example.text[0] for example in examples])).float()
        batch["text_mask"] = torch.from_numpy(np.stack([example.text[1] for example in examples]))
    return batch


class VideoLoader:
    """One data-parallel rank's batches: iterate for them; `state_dict()` / `load_state_dict()` to resume."""

    def __init__(self, sources: list[list[str]], settings: LoaderSettings, rank: int = 0, world: int = 1):
        if not 1 <= len(sources) <= 2:
            raise ValueError("a loader reads one shard set, or two (videos, then images)")
        if len(settings.batch_sizes) != len(settings.table.buckets) or min(settings.batch_sizes) < 1:
            raise ValueError("need one batch size >= 1 per bucket")
        self.settings, self.rank, self.world = settings, rank, world
        # resolved at start, so a decoder that cannot load is one clear error, not a skip per sample;
        # latent shards decode nothing
        latents = settings.latent_shapes is not None
        self.decoder = settings.decoder if latents else resolve_decoder(settings.decoder)
        self.rejected: Counter = Counter()  # unusable from metadata, over the whole corpus
        self.bucket_counts: Counter = Counter()
        self.placer = Placer(settings.table, settings.target_fps, settings.max_upscale)
        digest = hashlib.sha1()
        self.indexes: list[ShardSetIndex] = []
        planners = [self._index_and_plan(position, urls, digest) for position, urls in enumerate(sources)]
        # every shard's index and every sample's bucket: ranks compare it (`train.check_same_data`)
        self.index_digest = digest.hexdigest()[:16]
        self.mixture = Mixture(planners, settings.image_ratio if len(sources) == 2 else 0.0)
        self.cursor = RankCursor(world=world, rank=rank)
        self.skipped: Counter = Counter()  # decode-time skips on this rank
        self.plan_id = self._plan_id()

    def _index_and_plan(self, position: int, urls: list[str], digest: hashlib._Hash) -> EpochPlanner:
        """Index one shard set, place each sample in a bucket shard by shard (of the records, only
        the (N,) int16 buckets are kept), and make its planner."""
        table, settings = self.settings.table, self.settings
        index, parts = ShardSetIndex(urls), []
        for location, index_file, shard in shard_indexes(urls, settings.cache_dir):
            index.add(location, index_file, shard)
            buckets = self.placer.place(shard, self.rejected)
            digest.update(f"{Path(location).name}|{shard.tar_bytes}|{len(shard)}|{shard.checksum};".encode())
            digest.update(buckets)
            parts.append(buckets)
        self.indexes.append(index)
        bucket_of = np.concatenate(parts) if parts else np.zeros(0, np.int16)  # (N,)
        del parts
        self.rejected.update(index.rejected)
        if index.corrupt_shards:
            self.rejected["corrupt_shard"] += index.corrupt_shards
        if not (bucket_of >= 0).any():
            raise ShardError(
                f"no usable sample in {len(urls)} shards (e.g. {urls[0]}); rejected by reason: {dict(self.rejected)}"
            )
        weights = tuple(bucket.weight for bucket in table.buckets)
        planner = EpochPlanner(
            position,
            index.bounds,
            bucket_of,
            settings.batch_sizes,
            weights,
            settings.seed,
            settings.shuffle_window,
        )
        counts = planner.shard_counts.sum(axis=0)  # (B,) usable samples per bucket
        self.bucket_counts.update({b.name: int(n) for b, n in zip(table.buckets, counts, strict=True) if n})
        return planner

    def _plan_id(self) -> str:
        settings = self.settings
        described = {
            "planning": PLAN_VERSION,
            "sources": [[[Path(url).name for url in index.urls], len(index)] for index in self.indexes],
            "table": [[b.name, b.weight] for b in settings.table.buckets] + [settings.table.stride],
            "batch_sizes": settings.batch_sizes,
            "seed": settings.seed,
            "shuffle_window": settings.shuffle_window,
            "image_ratio": self.mixture.ratio,
            "target_fps": settings.target_fps,
            "max_upscale": str(settings.max_upscale),
        }
        return hashlib.sha1(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]

    def planned(self, j: int) -> PlannedBatch:
        """This rank's j-th batch of the plan (counting from the current start)."""
        return self.mixture.batch(self.cursor.position(j))

    def _tasks(self, first: int, plan_order: deque) -> Iterator[SampleTask]:
        for j in itertools.count(first):
            planned = self.planned(j)
            bucket = self.settings.table.buckets[planned.bucket]
            index = self.indexes[planned.source]
            latent = self.settings.latent_shapes[planned.bucket] if self.settings.latent_shapes else None
            plan_order.append((j, planned))
            for sample in planned.samples:
                location, start, length = index.sample_range(int(sample))
                yield SampleTask(
                    location, start, length, bucket.frames, bucket.height, bucket.width, latent, planned.epoch
                )

    def __iter__(self) -> Iterator[Batch]:
        settings = self.settings
        sample_settings = SampleSettings(
            settings.seed, settings.table.stride, settings.target_fps, settings.window, self.decoder
        )
        work = partial(load_example, sample_settings)
        plan_order: deque = deque()
        tasks = self._tasks(self.cursor.taken, plan_order)
        if settings.num_workers == 0:
            results: Iterator = ((task, work(task)) for task in tasks)
        else:
            largest = max(settings.batch_sizes)
            results = _Prefetcher(
                supervised_map(
                    work, tasks, settings.num_workers, settings.decode_timeout,
                    max_pending=4 * settings.num_workers + largest, max_tasks=settings.worker_max_tasks,
                    worker_setup=single_threaded,
                ),
                depth=settings.prefetch_batches * largest,
            )  # fmt: skip
        try:
            empty_run = 0  # consecutive batches without one usable sample
            while True:
                _, first = next(results)
                j, planned = plan_order.popleft()  # queued before its first sample was
                outcomes = [first] + [next(results)[1] for _ in range(len(planned.samples) - 1)]
                examples = [outcome for outcome in outcomes if isinstance(outcome, Example)]
                # Skipped, or a WorkerFailure: the decode hung (timeout) or crashed its worker
                skipped = Counter(outcome.reason for outcome in outcomes if not isinstance(outcome, Example))
                self.cursor.taken = j + 1
                self.skipped.update(skipped)
                if examples:
                    empty_run = 0
                    yield collate(examples, planned, settings.table.buckets[planned.bucket].name)
                    continue
                empty_run += 1
                if empty_run >= self.mixture.planners[planned.source].epoch_length(planned.epoch):
                    raise ShardError(
                        f"rank {self.rank}: an epoch's worth of batches without one usable sample "
                        f"(skipped by reason: {dict(self.skipped)})"
                    )
        finally:
            if isinstance(results, _Prefetcher):
                results.close()

    def skip_counts(self) -> dict[str, int]:
        """Samples skipped while decoding on this rank so far, by reason."""
        return dict(self.skipped)

    def state_dict(self) -> dict:
        """This rank's place in the plan, and its skip counts (plain types)."""
        return {
            "version": STATE_VERSION,
            "plan": self.plan_id,
            "cursor": self.cursor.state(),
            "skipped": dict(self.skipped),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from this rank's own state (same ranks) or a `merge_loader_states` result (any ranks)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"loader state version {state.get('version')} is not {STATE_VERSION}; start a new run"
            )
        if state["plan"] != self.plan_id:
            raise ValueError(
                "the data plan changed since this state was saved (shards, bucket table, batch sizes, seed, "
                "shuffle window, image ratio, frame rate, or the planning rule of this version); resume with "
                "the same data settings"
            )
        cursor = state["cursor"]
        if "rank" not in cursor:  # merged over all ranks of the saving run
            self.cursor = RankCursor(cursor["start"], tuple(cursor["done"]), self.world, self.rank, 0)
            self.skipped = Counter(state["skipped"] if self.rank == 0 else {})
            return
        if (cursor["world"], cursor["rank"]) != (self.world, self.rank):
            raise ValueError(
                f"this state is rank {cursor['rank']} of {cursor['world']}; this loader is rank {self.rank} of "
                f"{self.world}: merge every rank's state with merge_loader_states()"
            )
        self.cursor = replace(RankCursor(**cursor))
        self.skipped = Counter(state["skipped"])


class _Prefetcher:
    """Drives a generator in a background thread, so decoding continues while the caller trains."""

    _END = object()

    def __init__(self, source: Iterator, depth: int):
        self.source, self.items = source, queue.Queue(maxsize=max(1, depth))
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="loader-prefetch")
        self.thread.start()

    def _run(self) -> None:
        try:
            for item in self.source:
                while not self.stopping.is_set():
                    try:
                        self.items.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stopping.is_set():
                    return
        except BaseException as error:  # handed to the consumer
            self.error = error
        finally:
            self.source.close()
            self.items.put(self._END)

    def __iter__(self) -> _Prefetcher:
        return self

    def __next__(self) -> Any:
        item = self.items.get()
        if item is self._END:
            if self.error is not None:
                raise self.error
            raise StopIteration
        return item

    def close(self) -> None:
        """Stop the thread and the worker processes behind it."""
        self.stopping.set()
        while self.thread.is_alive():
            try:
                self.items.get(timeout=0.1)
            except queue.Empty:
                continue
        self.thread.join()
