"""A streaming, resumable video loader over webdataset shards.

Each data-parallel rank reads its own shards (a seeded shuffle per epoch, then every
`world`-th shard), and each DataLoader worker every `num_workers`-th of those. A worker
streams raw samples through a seeded shuffle buffer, decodes each into a clip, skips and
counts the ones that cannot be used, and yields shape-homogeneous batches that carry the
worker's position (epoch, samples emitted, skip counts). The main process keeps the
position of the last batch it consumed from each worker, so `state_dict()` is exact:
after `load_state_dict()` the batch sequence continues as if never interrupted, and the
consumed samples are skipped without being decoded.
"""

from __future__ import annotations

import copy
import random
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .decode import ClipSpec, SkipSample, decode_clip
from .shards import ShardError, iter_shard, load_npy, read_captioned

Batch = dict[str, Any]


def fresh_position() -> dict:
    """Where a worker stream starts: epoch 0, nothing emitted, nothing skipped."""
    return {"epoch": 0, "emitted": 0, "skipped": {}}


def epoch_shards(
    shards: list[str], seed: int, epoch: int, rank: int, world: int, worker: int, workers: int
) -> list[str]:
    """The shards one worker of one rank reads in an epoch (seeded shuffle, then strided split)."""
    order = list(shards)
    random.Random(f"{seed}/{epoch}").shuffle(order)
    return order[rank::world][worker::workers]


def shuffle_buffer(samples: Iterator[dict], size: int, rng: np.random.Generator) -> Iterator[dict]:
    """Shuffle a stream with a buffer of `size` samples (deterministic given `rng`)."""
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        slot = int(rng.integers(size))
        yield buffer[slot]
        buffer[slot] = sample
    for slot in rng.permutation(len(buffer)):
        yield buffer[slot]


@dataclass(frozen=True)
class Clip:
    """One training example: (C, F, H, W) pixels or (C, f, h, w) latents, and its caption."""

    key: str
    caption: str
    x: torch.Tensor
    text: tuple[torch.Tensor, torch.Tensor] | None = None  # precomputed (T, E) embedding and (T,) mask


@dataclass(frozen=True)
class StreamSettings:
    """What every worker stream of one rank shares.

    `latent_shape` = (C, f, h, w) switches the stream to precomputed latent shards
    (`sora-prep encode`): samples carry `latent.npy` instead of video, and a latent of another
    shape (another bucket) is skipped as `wrong_bucket`.
    """

    shards: list[str]
    spec: ClipSpec
    batch_size: int
    seed: int
    rank: int
    world: int
    num_workers: int  # logical streams (at least 1)
    buffer_size: int
    latent_shape: tuple[int, int, int, int] | None = None


class ClipStream(IterableDataset):
    """Endless batches of clips for one data-parallel rank, split over DataLoader workers."""

    def __init__(self, settings: StreamSettings, positions: list[dict], worker_offset: int):
        super().__init__()
        self.settings, self.positions, self.worker_offset = settings, positions, worker_offset

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        streams = self.settings.num_workers
        worker = (physical + self.worker_offset) % streams  # the logical stream this process plays
        yield from self._batches(worker, copy.deepcopy(self.positions[worker]))

    def _batches(self, worker: int, position: dict) -> Iterator[Batch]:
        settings = self.settings
        epoch, resume_at, skipped = position["epoch"], position["emitted"], Counter(position["skipped"])
        cursor = {"emitted": 0}  # samples out of the shuffle buffer so far this epoch
        clips: list[Clip] = []

        def count_shard_error(reason: str) -> None:
            if (
                cursor["emitted"] >= resume_at
            ):  # errors met while replaying consumed samples were counted before
                skipped[reason] += 1

        while True:
            shards = epoch_shards(
                settings.shards,
                settings.seed,
                epoch,
                settings.rank,
                settings.world,
                worker,
                settings.num_workers,
            )
            rng = np.random.default_rng([settings.seed, epoch, settings.rank, worker])
            cursor["emitted"] = produced = 0
            for sample in shuffle_buffer(
                self._raw_samples(shards, count_shard_error), settings.buffer_size, rng
            ):
                cursor["emitted"] += 1
                if cursor["emitted"] <= resume_at:
                    continue  # consumed before the checkpoint: skipped without decoding
                try:
                    clips.append(self._prepare(sample, epoch))
                except SkipSample as skip:
                    skipped[skip.reason] += 1
                    continue
                produced += 1
                if len(clips) == settings.batch_size:
                    state = {"epoch": epoch, "emitted": cursor["emitted"], "skipped": dict(skipped)}
                    yield collate(clips, worker, state)
                    clips = []
            if (
                produced == 0 and resume_at == 0
            ):  # a whole epoch without one usable sample: never spin silently
                raise ShardError(
                    f"rank {settings.rank} worker {worker}: no usable sample in {len(shards)} shards "
                    f"(skipped by reason: {dict(skipped)})"
                )
            epoch, resume_at = epoch + 1, 0

    @staticmethod
    def _raw_samples(shards: list[str], on_error: Any) -> Iterator[dict]:
        for path in shards:
            try:
                yield from iter_shard(path)
            except Exception:  # a truncated or corrupt tar: keep what was read, count it, move on
                on_error("corrupt_shard")

    def _prepare(self, sample: dict, epoch: int) -> Clip:
        key = sample["__key__"]
        meta, caption = read_captioned(sample)
        if self.settings.latent_shape is not None:
            return Clip(key, caption, self._latent(sample), self._text(sample))
        if "mp4" not in sample:
            raise SkipSample("missing_video")
        rng = np.random.default_rng([self.settings.seed, epoch, zlib.crc32(key.encode())])
        window = meta.get("frame_window")
        if window is not None and not (isinstance(window, list) and len(window) == 2):
            raise SkipSample("bad_metadata", f"frame_window {window!r} is not [first, last)")
        return Clip(key, caption, decode_clip(sample["mp4"], self.settings.spec, rng, window))

    def _latent(self, sample: dict) -> torch.Tensor:
        """A precomputed (C, f, h, w) latent as float32; raises SkipSample for a missing or other-shaped one."""
        if "latent.npy" not in sample:
            raise SkipSample("missing_latent")
        try:
            latent = load_npy(sample["latent.npy"])
        except ValueError as error:
            raise SkipSample("bad_latent", str(error)) from error
        if tuple(latent.shape) != self.settings.latent_shape:
            raise SkipSample("wrong_bucket", f"latent {latent.shape} != {self.settings.latent_shape}")
        return torch.from_numpy(latent.astype(np.float32))

    @staticmethod
    def _text(sample: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Precomputed caption embedding (T, E) and mask (T,), when the shard has them."""
        if "text.npy" not in sample:
            return None
        try:
            text = load_npy(sample["text.npy"]).astype(np.float32)
            mask = load_npy(sample["text_mask.npy"]).astype(bool)
        except (KeyError, ValueError) as error:
            raise SkipSample("bad_text_embedding", str(error)) from error
        if text.ndim != 2 or mask.shape != text.shape[:1] or not mask.any():
            raise SkipSample("bad_text_embedding", f"text {text.shape}, mask {mask.shape}")
        return torch.from_numpy(text), torch.from_numpy(mask)


def merge_counts(counts: list[dict[str, int]]) -> dict[str, int]:
    """Sum counters such as skipped samples by reason (over workers, or over ranks)."""
    total: Counter = Counter()
    for count in counts:
        total.update(count)
    return dict(total)


def collate(clips: list[Clip], worker: int, position: dict) -> Batch:
    """Stack clips into a batch: x (B, C, F, H, W), caption [B], key [B], plus the stream position.

    With precomputed caption embeddings, also text (B, T, E) and text_mask (B, T).
    """
    batch = {
        "x": torch.stack([clip.x for clip in clips]),
        "caption": [clip.caption for clip in clips],
        "key": [clip.key for clip in clips],
        "worker": worker,
        "position": position,
    }
    if all(clip.text is not None for clip in clips):
        batch["text"] = torch.stack([clip.text[0] for clip in clips])
        batch["text_mask"] = torch.stack([clip.text[1] for clip in clips])
    return batch


class VideoLoader:
    """The rank's loader: iterate for batches; `state_dict()` / `load_state_dict()` for exact resume."""

    def __init__(
        self,
        shards: list[str],
        spec: ClipSpec,
        batch_size: int,
        seed: int,
        rank: int,
        world: int,
        num_workers: int,
        buffer_size: int,
        latent_shape: tuple[int, int, int, int] | None = None,
    ):
        streams = max(1, num_workers)
        if len(shards) < world * streams:
            raise ShardError(
                f"{len(shards)} shards cannot feed {world} data-parallel ranks × {streams} loader workers; "
                "write more shards or lower data.num_workers"
            )
        self.settings = StreamSettings(
            shards, spec, batch_size, seed, rank, world, streams, buffer_size, latent_shape
        )
        self.num_workers = num_workers
        self.positions = [fresh_position() for _ in range(streams)]
        self.consumed = 0

    def __iter__(self) -> Iterator[Batch]:
        offset = self.consumed % len(self.positions)
        stream = ClipStream(self.settings, copy.deepcopy(self.positions), offset)
        loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=2 if self.num_workers else None,
        )
        for batch in loader:
            self.positions[batch["worker"]] = batch["position"]
            self.consumed += 1
            yield batch

    def skip_counts(self) -> dict[str, int]:
        """Samples skipped so far on this rank, by reason."""
        return merge_counts([position["skipped"] for position in self.positions])

    def state_dict(self) -> dict:
        """Everything needed to continue exactly after the last consumed batch."""
        return {
            "positions": copy.deepcopy(self.positions),
            "consumed": self.consumed,
            "world": self.settings.world,
            "num_shards": len(self.settings.shards),
            "seed": self.settings.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; the rank count, worker count, seed and shard count must match."""
        saved = (state["world"], len(state["positions"]), state["num_shards"], state["seed"])
        current = (self.settings.world, len(self.positions), len(self.settings.shards), self.settings.seed)
        if saved != current:
            raise ValueError(
                "loader state was saved with (ranks, workers, shards, seed) = "
                f"{saved}, this run has {current}; resume with the same settings"
            )
        self.positions = copy.deepcopy(state["positions"])
        self.consumed = state["consumed"]
