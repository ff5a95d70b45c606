"""Checkpoints: DeepSpeed's sharded model/optimizer state plus everything else a resume needs.

Layout of RUN_DIR/checkpoints/step_XXXXXXX/:
  DeepSpeed files       model and optimizer shards, LR schedule (written by every rank)
  rank_NNNNN.pt         per-rank RNG states and loader position (tensors and plain types only)
  trainer_state.json    step, EMA update count, wandb run id, world size
  ema.safetensors       EMA weights; config.json rebuilds the model (so a checkpoint samples directly)
RUN_DIR/checkpoints/latest names the newest checkpoint; it is written last, after every rank's files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, TrainConfig
from .parallel.dist import DistInfo, barrier
from .pretrained import EMA_WEIGHTS, inference_config, save_weights, write_config

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"


def checkpoint_root(run_dir: str | Path) -> Path:
    """RUN_DIR/checkpoints."""
    return Path(run_dir) / CHECKPOINTS


def tag_for(step: int) -> str:
    """Directory name of the checkpoint at `step`."""
    return f"step_{step:07d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def capture_rng(generator: torch.Generator) -> dict:
    """Python, NumPy, torch CPU (and CUDA) RNG states and the trainer's generator, as tensors and plain types."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, generator: torch.Generator) -> None:
    """Undo `capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    keys = numpy_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(
        ("MT19937", keys, numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached"])
    )
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    engine,
    cfg: TrainConfig,
    dist_info: DistInfo,
    step: int,
    rank_state: dict,
    trainer_state: dict,
    ema_weights: dict,
) -> Path:
    """Save on every rank (collective); returns the checkpoint directory."""
    root, tag = checkpoint_root(cfg.run_dir), tag_for(step)
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    directory = root / tag
    torch.save(rank_state, directory / rank_file(dist_info.rank))
    if dist_info.is_main:
        save_weights(directory / EMA_WEIGHTS, ema_weights)
        write_config(directory, inference_config(cfg))
        (directory / TRAINER_STATE).write_text(json.dumps({**trainer_state, "step": step}, indent=2) + "\n")
    barrier()
    if dist_info.is_main:
        pointer = root / f".{LATEST}.tmp"
        pointer.write_text(tag + "\n")
        pointer.replace(root / LATEST)
    barrier()
    return directory


def find_checkpoint(cfg: TrainConfig) -> Path | None:
    """The checkpoint directory `cfg.resume` asks for, or None for a fresh start.

    auto: the newest in the run dir, if any. never: None. PATH: a checkpoint directory, or a
    run dir whose newest checkpoint is taken; an empty or invalid PATH is an error.
    """
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        pointer = checkpoint_root(cfg.run_dir) / LATEST
        return (
            _checked(checkpoint_root(cfg.run_dir) / pointer.read_text().strip()) if pointer.exists() else None
        )
    path = Path(cfg.resume)
    pointer = checkpoint_root(path) / LATEST
    if pointer.exists():
        return _checked(checkpoint_root(path) / pointer.read_text().strip())
    return _checked(path)


def _checked(directory: Path) -> Path:
    if not (directory / TRAINER_STATE).is_file():
        raise ConfigError(f"{directory} is not a complete checkpoint (no {TRAINER_STATE})")
    return directory


def load_checkpoint(engine, directory: Path, dist_info: DistInfo) -> tuple[dict, dict]:
    """Load model, optimizer and schedule into `engine`; return (trainer_state, this rank's state)."""
    trainer_state = json.loads((directory / TRAINER_STATE).read_text())
    if trainer_state["world_size"] != dist_info.world_size:
        raise ConfigError(
            f"{directory} was saved by {trainer_state['world_size']} processes, this run has {dist_info.world_size}; "
            "resume with the same number of processes"
        )
    path, _ = engine.load_checkpoint(str(directory.parent), tag=directory.name)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")
    rank_state = torch.load(directory / rank_file(dist_info.rank), weights_only=True)
    return trainer_state, rank_state
