"""Choosing the checkpoint to resume from, checking it fits this run, and loading it.

A checkpoint is resumed only when its manifest verifies: every listed file present with its
size and (by default) its checksum, and nothing unlisted beside them. Verification is split
over the ranks. Interrupted and corrupted saves are reported and passed over; a run that has
checkpoints but no valid one stops rather than silently starting over.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..config import ConfigError, TrainConfig
from ..parallel.zero import full_shape
from ..pretrained import EMA_WEIGHTS
from .manifest import CheckpointInvalid, file_problems, read_manifest, unlisted_files
from .safe_load import weights_only_loads
from .saving import TRAINER_STATE, rank_file
from .store import CheckpointStore, checkpoint_root, is_checkpoint_dir

Gather = Callable[[object], list]  # one object from every rank, in rank order


def _local(obj: object) -> list:
    return [obj]


@dataclass
class Selection:
    """The checkpoint to resume from (None: start fresh) and what was passed over on the way."""

    directory: Path | None
    passed_over: list[str] = field(default_factory=list)
    set_aside: list[str] = field(default_factory=list)  # newer checkpoints of an abandoned branch


def verify_checkpoint(
    directory: Path, deep: bool = True, rank: int = 0, world: int = 1, gather: Gather = _local
) -> list[str]:
    """Problems with a checkpoint directory (empty: it verifies). With `world` > 1 it is a
    collective: each rank checks its share of the files and all ranks get the same answer."""
    try:
        manifest = read_manifest(directory)
        names = sorted(manifest["files"])
        problems = file_problems(directory, manifest, names[rank::world], deep)
        if rank == 0:
            problems += [f"{name} is not in the manifest" for name in unlisted_files(directory, manifest)]
    except CheckpointInvalid as error:
        problems = [str(error)] if rank == 0 else []
    return [problem for share in gather(problems) for problem in share]


def newest_valid_checkpoint(
    path: Path, deep: bool = True, rank: int = 0, world: int = 1, gather: Gather = _local
) -> Selection:
    """`path` if it is a valid checkpoint directory, else the newest valid checkpoint of the run
    dir `path` (collective when `world` > 1). None when there is no checkpoint at all; raises
    CheckpointInvalid, naming what is wrong with each, when there are some but none is valid."""
    if is_checkpoint_dir(path):
        store, candidates = CheckpointStore(path.parent), [path]
    else:
        store = CheckpointStore(checkpoint_root(path))
        candidates = store.committed()
    passed_over = [f"{staged.name}: a save that never finished" for staged in store.interrupted()]
    for candidate in candidates:
        problems = verify_checkpoint(candidate, deep, rank, world, gather)
        if not problems:
            return Selection(candidate, passed_over)
        passed_over.append(f"{candidate.name}: {'; '.join(problems[:3])}")
    if candidates:
        raise CheckpointInvalid(f"no valid checkpoint in {path} ({'; '.join(passed_over)})")
    return Selection(None, passed_over)


def find_checkpoint(cfg: TrainConfig, rank: int = 0, world: int = 1, gather: Gather = _local) -> Selection:
    """The checkpoint `cfg.resume` asks for (collective when `world` > 1).

    auto: the newest valid one in the run dir, or a fresh start when it has none at all.
    never: a fresh start. PATH: that checkpoint directory, or the newest valid one in that run dir.
    """
    if cfg.resume == "never":
        return Selection(None)
    path = Path(cfg.run_dir if cfg.resume == "auto" else cfg.resume)
    hint = "pass resume=never to start a new run, or resume=PATH for another checkpoint"
    try:
        selection = newest_valid_checkpoint(path, cfg.checkpoint.verify == "checksum", rank, world, gather)
    except CheckpointInvalid as error:
        raise ConfigError(f"{error}; {hint}") from error
    if selection.directory is None and cfg.resume != "auto":
        raise ConfigError(f"no valid checkpoint in {path} (no checkpoints); {hint}")
    return selection


def read_trainer_state(directory: Path) -> dict:
    """trainer_state.json of a checkpoint."""
    return json.loads((directory / TRAINER_STATE).read_text())


def read_rank_state(directory: Path, rank: int) -> dict:
    """One saving rank's RNG and loader state (weights-only load: plain data and tensors)."""
    return torch.load(directory / rank_file(rank), weights_only=True)


def check_model_fits(directory: Path, model: nn.Module, saved_config: dict, cfg: TrainConfig) -> None:
    """Refuse a checkpoint whose parameter names or shapes differ from `model`'s, naming the first
    difference and the model settings that changed."""
    with safe_open(str(directory / EMA_WEIGHTS), framework="pt") as weights:
        saved = {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}  # noqa: SIM118 (safe_open is not iterable)
    current = {name: tuple(full_shape(p)) for name, p in model.named_parameters() if p.requires_grad}
    if saved == current:
        return
    differing = sorted(set(saved) ^ set(current)) or sorted(n for n in saved if saved[n] != current[n])
    name = differing[0]
    changed = [key for key, _, _ in config_changes(saved_config.get("model", {}), asdict(cfg.model), "model")]
    raise ConfigError(
        f"{directory.name} holds a different model: {name} is {saved.get(name, 'absent')} there and "
        f"{current.get(name, 'absent')} here (changed: {', '.join(changed) or 'the model code'}); "
        "resume with the model settings it was trained with, or start a new run (resume=never)"
    )


IGNORED_CHANGES = ("run_dir", "resume")


def config_changes(saved: dict, current: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(key, saved value, current value) for every setting that differs, as dotted keys."""
    changes = []
    for key in sorted(set(saved) | set(current)):
        dotted = f"{prefix}.{key}" if prefix else key
        old, new = saved.get(key), current.get(key)
        if dotted in IGNORED_CHANGES:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            changes += config_changes(old, new, dotted)
        elif old != new:
            changes.append((dotted, old, new))
    return changes


def resumed_accumulation(trainer_state: dict, cfg: TrainConfig, data_world: int) -> int:
    """Gradient accumulation steps that keep the saved per-rank micro batch and global batch on
    `data_world` data-parallel ranks (the loader's batches are sized per rank, so they must not change)."""
    saved_data_world = trainer_state["world_size"] // trainer_state.get("sequence_parallel", 1)
    saved_accum = trainer_state["grad_accum_steps"]
    if saved_data_world == data_world:
        return cfg.train.grad_accum_steps
    passes = saved_data_world * saved_accum  # micro-batches per optimizer step, over all data-parallel ranks
    if passes % data_world:
        raise ConfigError(
            f"the checkpoint takes {passes} micro-batches per step ({saved_data_world} data-parallel rank(s) × "
            f"{saved_accum} accumulation step(s)), which {data_world} data-parallel ranks cannot share evenly "
            f"at the same micro batch; resume with a number of data-parallel ranks that divides {passes}"
        )
    return passes // data_world


def load_engine_state(engine, directory: Path, frozen_excluded: bool = False) -> None:
    """Model, optimizer and LR schedule into `engine` (collective); DeepSpeed's files are read
    with weights-only loads. `frozen_excluded`: the checkpoint holds only the parameters that train
    (LoRA), so the module's frozen ones are expected to be absent (the EMA check has matched names)."""
    with weights_only_loads():
        path, _ = engine.load_checkpoint(
            str(directory.parent), tag=directory.name, load_module_strict=not frozen_excluded
        )
    if path is None:
        raise CheckpointInvalid(f"DeepSpeed found no checkpoint in {directory}")
