"""The collective, atomic save of everything a resume needs.

Layout of a committed RUN_DIR/checkpoints/step_XXXXXXX/:
  DeepSpeed files       model and optimizer shards, LR schedule (written by every rank)
  rank_NNNNN.pt         per-rank RNG states and loader position (tensors and plain types only)
  trainer_state.json    step, world layout, EMA update count, guard statistics, wandb run id, config
  ema.safetensors       EMA weights; config.json rebuilds the model (so a checkpoint samples directly)
  manifest.json         every file above with its size and CRC-32, written last
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..parallel.dist import DistInfo, all_gather_objects, barrier
from ..pretrained import EMA_WEIGHTS, InferenceConfig, save_weights, write_config
from .manifest import PART_PREFIX, describe_files, fsync_path, list_files, write_manifest
from .store import CheckpointStore, checkpoint_root, tag_for

TRAINER_STATE = "trainer_state.json"


_RANK_MARK = re.compile(r"(?:^|_)zero_pp_rank_(\d+)_|^rank_(\d{5})\.pt$")


def file_writer(name: str) -> int:
    """The rank that writes a checkpoint file: the one its name carries (DeepSpeed's
    `zero_pp_rank_R_`, our `rank_RRRRR.pt`), else rank 0 (model states, EMA, config, trainer state)."""
    match = _RANK_MARK.search(Path(name).name)
    return int(match[1] or match[2]) if match else 0


def files_written_by(rank: int, listing: list[str]) -> list[str]:
    """The files of a staging directory's `listing` that `rank` wrote. Each rank describes only
    these, from its own listing: on a network filesystem a rank sees its own files at once, while
    its view of the others' may lag (attribute caching), so no file goes undescribed."""
    return [name for name in listing if file_writer(name) == rank]


def rank_file(rank: int) -> str:
    """This rank's RNG and loader state file."""
    return f"rank_{rank:05d}.pt"


class CheckpointSaveFailed(RuntimeError):
    """A save failed (writing its files, or its background part); the checkpoint was not committed."""


@dataclass
class PendingSave:
    """A save whose flush, checksums and commit may still be running on a background thread."""

    directory: Path  # where the checkpoint is once committed
    thread: threading.Thread | None = None
    errors: list[BaseException] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.thread is None or not self.thread.is_alive()

    def wait(self) -> Path:
        """Block until this rank's part is finished (on rank 0: the commit); re-raise its failure."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.errors:
            raise CheckpointSaveFailed(
                f"saving {self.directory.name} failed: {self.errors[0]}"
            ) from self.errors[0]
        return self.directory


def save_checkpoint(
    engine,
    run_dir: str | Path,
    dist_info: DistInfo,
    step: int,
    rank_state: dict,
    trainer_state: dict,
    ema_weights: dict,
    inference: InferenceConfig,
    keep_last: int = 0,
    keep_every: int = 0,
    background: bool = False,
    frozen_excluded: bool = False,
) -> PendingSave:
    """Save on every rank (collective). `frozen_excluded`: leave out parameters that do not train
    (LoRA's base weights, which the run reads from `model.init_from`).

    Every rank writes into a staging directory; each then flushes and checksums the files it
    wrote (`files_written_by`); rank 0 writes the manifest, renames the directory into place, moves `latest`
    and, once the other ranks have moved on, prunes old checkpoints. A crash at any point leaves the previous checkpoints intact.

    The writing is done when this returns. With `background`, the flush, checksums and commit
    continue on a thread while training goes on (ranks hand their checksums to rank 0 through
    files instead of a collective); `wait()` on the result before the next save and before exit.
    """
    store = CheckpointStore(checkpoint_root(run_dir))
    staging = store.staging_dir(step)
    if dist_info.is_main:
        store.begin(step)
    barrier()
    try:
        engine.save_checkpoint(
            str(store.root), tag=staging.name, save_latest=False, exclude_frozen_parameters=frozen_excluded
        )
        torch.save(rank_state, staging / rank_file(dist_info.rank))
        if dist_info.is_main:
            save_weights(staging / EMA_WEIGHTS, ema_weights)
            write_config(staging, inference)
            (staging / TRAINER_STATE).write_text(json.dumps({**trainer_state, "step": step}, indent=2) + "\n")
    except OSError as error:  # a full disk, a quota, a lost mount: the older checkpoints are intact
        raise CheckpointSaveFailed(
            f"saving {tag_for(step)} failed on rank {dist_info.rank}: {error}"
        ) from error
    barrier()
    share = files_written_by(dist_info.rank, list_files(staging))
    pending = PendingSave(store.final_dir(step))
    if not background:
        shares = all_gather_objects(describe_files(staging, share))
        if dist_info.is_main:
            files = {name: entry for part in shares for name, entry in part.items()}
            _commit(store, step, files, dist_info.world_size)
        barrier()
        if dist_info.is_main:  # after the barrier: no rank waits for the deletions
            store.prune(keep_last, keep_every, keep=(tag_for(step),))
        return pending

    def finish() -> None:
        try:
            write_part(staging, dist_info.rank, describe_files(staging, share))
            if dist_info.is_main:
                files = gather_parts(staging, dist_info.world_size)
                _commit(store, step, files, dist_info.world_size)
                store.prune(keep_last, keep_every, keep=(tag_for(step),))
        except BaseException as error:  # reported by wait(), on the training thread
            pending.errors.append(error)

    pending.thread = threading.Thread(target=finish, name=f"commit-{staging.name}")
    pending.thread.start()
    return pending


def _commit(store: CheckpointStore, step: int, files: dict, world_size: int) -> None:
    write_manifest(store.staging_dir(step), files, step=step, world_size=world_size)
    store.commit(step)


def write_part(staging: Path, rank: int, files: dict) -> None:
    """This rank's share of the manifest, published with one rename."""
    partial = staging / f"{PART_PREFIX}{rank:05d}.tmp"
    partial.write_text(json.dumps(files))
    fsync_path(partial)
    os.replace(partial, staging / f"{PART_PREFIX}{rank:05d}.json")


def gather_parts(staging: Path, world_size: int, timeout: float = 3600.0) -> dict:
    """Every rank's share of the manifest once all are there (polled); the part files are removed."""
    paths = [staging / f"{PART_PREFIX}{rank:05d}.json" for rank in range(world_size)]
    deadline = time.monotonic() + timeout
    while not all(path.exists() for path in paths):
        if time.monotonic() > deadline:
            missing = [path.name for path in paths if not path.exists()]
            raise TimeoutError(f"no checksums from {', '.join(missing)} after {timeout:.0f}s")
        time.sleep(0.05)
    files = {name: entry for path in paths for name, entry in json.loads(path.read_text()).items()}
    for path in paths:
        path.unlink()
    return files
