"""Writing a Wan transformer folder: diffusers' layout (`write_diffusers`) or the original release's
(`write_wan`), config.json from a ModelConfig, safetensors sharded with an index when large.

Every folder is written to a staging directory beside `out` and renamed into place, so nothing
partial is ever visible at `out`; an existing `out` must be empty. Names and shapes are checked
against the ModelConfig before a byte is written.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .loading import DIT_PREFIX, mismatch_message
from .reading import (
    DIFFUSERS_INDEX,
    DIFFUSERS_WEIGHTS,
    MIN_DIFFUSERS,
    MIN_DIFFUSERS_FLF2V,
    PretrainedFormatError,
    installed_diffusers_version,
    require_diffusers,
)
from .wan_layout import (
    diffusers_config,
    diffusers_to_original_name,
    expected_shapes,
    model_architecture,
    original_config,
)

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
_STEM = DIFFUSERS_WEIGHTS.removesuffix(".safetensors")  # diffusion_pytorch_model, in both layouts


class WeightsDoNotFit(PretrainedFormatError):
    """Weights handed to a writer that do not match the ModelConfig's architecture."""


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def staged_directory(out: str | Path) -> Iterator[Path]:
    """A fresh directory beside `out` to write into; on success it is flushed and renamed to `out`,
    on failure removed. Raises FileExistsError when `out` exists and is not an empty directory."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty; choose another --out or empty it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.staging-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        yield staging
        for path in sorted(staging.rglob("*"), reverse=True):  # files before their directories
            _fsync(path)
        _fsync(staging)
        os.replace(staging, out)  # onto an empty directory too (POSIX rename)
        _fsync(out.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def transformer_weights(weights: Mapping[str, torch.Tensor], prefix: str) -> dict[str, str]:
    """{name without prefix: name in `weights`}; raises WeightsDoNotFit for a name outside `prefix`
    (a learned text encoder's `text_encoder.*`, which neither Wan layout can hold)."""
    outside = [name for name in weights if not name.startswith(prefix)]
    if outside:
        raise WeightsDoNotFit(
            f"{outside[0]} is not part of the transformer ({prefix}*): a Wan folder holds only the "
            "transformer, so a model with a learned text encoder exports only as --format native"
        )
    return {name.removeprefix(prefix): name for name in weights}


def _shape(weights: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    """A tensor's shape; a mapping with a `shape(name)` method (a lazy file) answers without reading."""
    shape_of = getattr(weights, "shape", None)
    return tuple(shape_of(name)) if callable(shape_of) else tuple(weights[name].shape)


def _check_weights(
    weights: Mapping[str, torch.Tensor], names: dict[str, str], arch: Mapping[str, Any]
) -> None:
    expected = expected_shapes(arch)
    missing = sorted(set(expected) - set(names))
    unexpected = sorted(names[name] for name in set(names) - set(expected))
    misshaped = [
        f"{names[name]}: {list(_shape(weights, names[name]))}, the config gives {list(shape)}"
        for name, shape in sorted(expected.items())
        if name in names and _shape(weights, names[name]) != shape
    ]
    if missing or unexpected or misshaped:
        raise WeightsDoNotFit(
            mismatch_message("the weights do not fit the model config", missing, unexpected, misshaped)
        )


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor that shares no memory with another (safetensors refuses aliases)."""
    tensor = tensor.detach()
    return tensor.to("cpu").contiguous() if tensor.device.type != "cpu" else tensor.contiguous().clone()


def write_safetensors(
    tensors: Iterator[tuple[str, torch.Tensor]],
    directory: Path,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
    """Write (name, tensor) pairs as diffusion_pytorch_model.safetensors, or, past `max_shard_bytes`,
    as diffusion_pytorch_model-0000i-of-0000n.safetensors + diffusers' index; at most one shard is
    held in memory. Returns the file names written."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    parts: list[str] = []
    sizes = {"shard": 0, "total": 0}
    weight_map: dict[str, int] = {}

    def flush() -> None:
        parts.append(f".part-{len(parts):05d}.safetensors")
        save_file(shards[0], str(directory / parts[-1]), metadata={"format": "pt"})
        shards[0], sizes["shard"] = {}, 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shards[0] and sizes["shard"] + nbytes > max_shard_bytes:
            flush()
        shards[0][name], weight_map[name] = _cpu_copy(tensor), len(parts)
        sizes["shard"] += nbytes
        sizes["total"] += nbytes
    flush()
    if len(parts) == 1:
        (directory / parts[0]).rename(directory / DIFFUSERS_WEIGHTS)
        return [DIFFUSERS_WEIGHTS]
    names = [f"{_STEM}-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
    for part, name in zip(parts, names, strict=True):
        (directory / part).rename(directory / name)
    index = {
        "metadata": {"total_size": sizes["total"]},
        "weight_map": {k: names[i] for k, i in weight_map.items()},
    }
    (directory / DIFFUSERS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [*names, DIFFUSERS_INDEX]


ConfigMaker = Callable[[Mapping[str, object], str], dict[str, object]]


def prepare(
    weights: Mapping[str, torch.Tensor], model_config: Any, prefix: str, make_config: ConfigMaker
) -> tuple[dict[str, object], dict[str, str]]:
    """Everything checked before a byte is written: (config.json, {diffusers name: name in weights})."""
    arch = model_architecture(model_config)
    config = make_config(arch, installed_diffusers_version() or MIN_DIFFUSERS)
    names = transformer_weights(weights, prefix)
    _check_weights(weights, names, arch)
    return config, names


def write_folder(
    directory: Path,
    config: Mapping[str, object],
    weights: Mapping[str, torch.Tensor],
    names: Mapping[str, str],
    rename: Callable[[str], str],
    max_shard_bytes: int,
) -> None:
    """config.json and the (renamed) tensors into an existing directory, as `prepare` planned them."""
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors = ((rename(name), weights[names[name]]) for name in sorted(names))
    write_safetensors(tensors, directory, max_shard_bytes)


def _write(
    weights: Mapping[str, torch.Tensor],
    model_config: Any,
    out: str | Path,
    prefix: str,
    max_shard_bytes: int,
    layout: tuple[ConfigMaker, Callable[[str], str]],
) -> Path:
    """Check, then write a folder of one layout: (config builder, name mapping)."""
    make_config, rename = layout
    config, names = prepare(weights, model_config, prefix, make_config)
    with staged_directory(out) as staging:
        write_folder(staging, config, weights, names, rename, max_shard_bytes)
    return Path(out)


def write_diffusers(
    weights: Mapping[str, torch.Tensor],
    model_config: Any,
    out: str | Path,
    prefix: str = DIT_PREFIX,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a folder diffusers' `WanTransformer3DModel.from_pretrained(out)` loads (without warnings).

    `weights`: the denoiser's state dict (`prefix` + diffusers names; nothing else); `model_config`:
    its `variant=wan` ModelConfig. Raises PretrainedFormatError (WeightsDoNotFit, WanConfigError,
    DiffusersTooOld) before anything is written, FileExistsError for a non-empty `out`.
    """
    require_diffusers(MIN_DIFFUSERS_FLF2V if model_config.pos_embed_seq_len is not None else MIN_DIFFUSERS)
    return _write(weights, model_config, out, prefix, max_shard_bytes, (diffusers_config, lambda name: name))


def write_wan(
    weights: Mapping[str, torch.Tensor],
    model_config: Any,
    out: str | Path,
    prefix: str = DIT_PREFIX,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a folder in the original Wan release's layout: its config.json (`WanModel`'s arguments)
    and diffusion_pytorch_model*.safetensors with the original names. Same arguments and errors as
    `write_diffusers`."""
    return _write(
        weights, model_config, out, prefix, max_shard_bytes, (original_config, diffusers_to_original_name)
    )
