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
from pathlib import Path

import torch

from ..parallel.dist import DistInfo, all_gather_objects, barrier
from ..pretrained import EMA_WEIGHTS, InferenceConfig, save_weights, write_config
from .manifest import describe_files, list_files, write_manifest
from .store import CheckpointStore, checkpoint_root

TRAINER_STATE = "trainer_state.json"


def rank_file(rank: int) -> str:
    """This rank's RNG and loader state file."""
    return f"rank_{rank:05d}.pt"


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
) -> Path:
    """Save on every rank (collective); returns the committed checkpoint directory.

    Every rank writes into a staging directory; each then flushes and checksums its share of
    the files; rank 0 writes the manifest, renames the directory into place, moves `latest`
    and prunes old checkpoints. A crash at any point leaves the previous checkpoints intact.
    """
    store = CheckpointStore(checkpoint_root(run_dir))
    staging = store.staging_dir(step)
    if dist_info.is_main:
        store.begin(step)
    barrier()
    engine.save_checkpoint(str(store.root), tag=staging.name, save_latest=False)
    torch.save(rank_state, staging / rank_file(dist_info.rank))
    if dist_info.is_main:
        save_weights(staging / EMA_WEIGHTS, ema_weights)
        write_config(staging, inference)
        (staging / TRAINER_STATE).write_text(json.dumps({**trainer_state, "step": step}, indent=2) + "\n")
    barrier()
    names = list_files(staging)
    shares = all_gather_objects(describe_files(staging, names[dist_info.rank :: dist_info.world_size]))
    if dist_info.is_main:
        files = {name: entry for share in shares for name, entry in share.items()}
        write_manifest(staging, files, step=step, world_size=dist_info.world_size)
        store.commit(step)
        store.prune(keep_last, keep_every)
    barrier()
    return store.final_dir(step)
