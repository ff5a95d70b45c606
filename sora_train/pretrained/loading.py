"""Initialising a model from a Wan transformer folder (diffusers or original layout), strictly.

`load_pretrained` checks every name and shape against the model from the file headers alone,
before it copies anything, so a folder that does not fit changes nothing; then it streams the
tensors one at a time into the parameters. `architecture` and `check_architecture` compare a
folder's config.json with a ModelConfig (for `model.init_from`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..parallel.zero import full_shape
from .reading import (
    Layout,
    PretrainedFormatError,
    TensorSpec,
    folder_architecture,
    iter_tensors,
    open_folder,
    tensor_specs,
)
from .wan_layout import ARCHITECTURE_FIELDS, model_architecture

DIT_PREFIX = "dit."  # where VideoDenoiser keeps the transformer
# (target parameter or buffer, loaded tensor already cast to the target's dtype) -> None
CopyFn = Callable[[torch.Tensor, torch.Tensor], None]


class WeightsMismatch(PretrainedFormatError):
    """A folder's tensors do not fit a model: missing, unexpected or mis-shaped names."""


class ArchitectureMismatch(PretrainedFormatError):
    """A folder's config.json describes another architecture than the ModelConfig."""


@dataclass(frozen=True)
class LoadedWeights:
    """What `load_pretrained` copied: from where, in which layout, how many tensors and bytes."""

    directory: Path
    layout: Layout
    tensors: int
    bytes: int


def copy_into(target: torch.Tensor, tensor: torch.Tensor) -> None:
    """The default copy: into the target's storage, on the target's device."""
    target.data.copy_(tensor)


def model_tensors(model: nn.Module, prefix: str = DIT_PREFIX) -> dict[str, torch.Tensor]:
    """The model's parameters and persistent buffers under `prefix`, by name without it."""
    return {
        name.removeprefix(prefix): tensor
        for name, tensor in model.state_dict(keep_vars=True).items()
        if name.startswith(prefix)
    }


def mismatch_message(subject: str, missing: list[str], unexpected: list[str], misshaped: list[str]) -> str:
    """`subject`: then one line naming what does not fit (the first three of each kind)."""

    def part(kind: str, names: list[str]) -> str:
        more = f", ... {len(names) - 3} more" if len(names) > 3 else ""
        return f"{len(names)} {kind} ({', '.join(names[:3])}{more})"

    kinds = (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
    return f"{subject}: " + "; ".join(part(kind, names) for kind, names in kinds if names)


def check_fits(
    targets: dict[str, torch.Tensor], specs: dict[str, TensorSpec], where: object, prefix: str
) -> None:
    """Raise WeightsMismatch unless the folder holds exactly the targets' names with their shapes."""
    if not targets:
        raise WeightsMismatch(f"the model has no parameters under {prefix!r} to load {where} into")
    missing = [f"{prefix}{name}" for name in sorted(set(targets) - set(specs))]
    unexpected = sorted(set(specs) - set(targets))
    misshaped = [
        f"{prefix}{name}: {list(specs[name].shape)} in the folder, {list(full_shape(target))} in the model"
        for name, target in sorted(targets.items())
        if name in specs and specs[name].shape != tuple(full_shape(target))
    ]
    if missing or unexpected or misshaped:
        raise WeightsMismatch(
            mismatch_message(f"{where} does not fit the model", missing, unexpected, misshaped)
        )


def load_pretrained(
    model: nn.Module, directory: str | Path, prefix: str = DIT_PREFIX, copy: CopyFn | None = None
) -> LoadedWeights:
    """Copy a Wan transformer folder's weights into `model`'s tensors under `prefix`, strictly.

    Every name and shape is checked from the file headers first (PretrainedFormatError naming
    what is missing, unexpected or mis-shaped; the model is then unchanged). The tensors are then
    read one at a time, in a fixed order, cast to each target's dtype and handed to
    `copy(target, tensor)` (default: `target.data.copy_(tensor)`). Under ZeRO-3, call it on every
    rank with a `copy` that gathers the one parameter, copies on one rank and re-partitions.
    """
    folder = open_folder(directory)
    targets = model_tensors(model, prefix)
    check_fits(targets, tensor_specs(folder), folder.directory, prefix)
    copy = copy or copy_into
    count = size = 0
    with torch.no_grad():
        for name, tensor in iter_tensors(folder):
            target = targets[name]
            copy(target, tensor.to(dtype=target.dtype))
            count, size = count + 1, size + tensor.numel() * tensor.element_size()
    return LoadedWeights(folder.directory, folder.layout, count, size)


def architecture(directory: str | Path) -> dict[str, object]:
    """The ModelConfig fields a Wan transformer folder fixes (field -> value), from its config.json."""
    return {name: folder_architecture(open_folder(directory))[name] for name in ARCHITECTURE_FIELDS}


def _shown(cfg: Any, name: str, value: object) -> str:
    """How a ModelConfig value reads in an error: as set, with the value it resolves to if unset."""
    raw = getattr(cfg, name)
    return f"{raw}" if raw is not None or value is None else f"None (so {value})"


def check_architecture(cfg: Any, directory: str | Path) -> None:
    """Raise ArchitectureMismatch (one line, the first differing field and both values) unless the
    ModelConfig `cfg` describes the architecture of the Wan transformer folder `directory`."""
    folder = open_folder(directory)
    theirs = folder_architecture(folder)
    ours = model_architecture(cfg)
    for name in ARCHITECTURE_FIELDS:
        if ours[name] != theirs[name]:
            raise ArchitectureMismatch(
                f"model.{name}={_shown(cfg, name, ours[name])} but {folder.config_path} says {theirs[name]}"
            )
    if ours["out_channels"] != theirs["out_channels"]:
        raise ArchitectureMismatch(
            f"model.latent_space={cfg.latent_space} has {ours['out_channels']} channels but "
            f"{folder.config_path} says the model predicts {theirs['out_channels']}"
        )
