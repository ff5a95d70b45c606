"""A Wan transformer folder in either layout: what it is, its tensors' names and shapes, its tensors.

Layouts (`open_folder` tells them apart by config.json):
  diffusers  config.json with `_class_name: WanTransformer3DModel`, and
             diffusion_pytorch_model.safetensors or shards + diffusion_pytorch_model.safetensors.index.json
  wan        the original release: config.json with WanModel's arguments (dim, num_heads, num_layers, ...)
             and safetensors (diffusion_pytorch_model*.safetensors, an index, or any *.safetensors),
             else .pth/.pt files

Tensors are read one at a time (`iter_tensors`): safetensors through `safe_open`, a .pth only
through `torch.load(weights_only=True, mmap=True)`, so nothing is unpickled beyond plain tensors
and a 14B model never sits in memory twice. Names are always diffusers' names.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import torch
from packaging.version import Version
from safetensors import SafetensorError, safe_open

from .wan_layout import (
    DIFFUSERS_CLASS,
    ORIGINAL_CLASS,
    PretrainedFormatError,
    UnknownWeightName,
    diffusers_architecture,
    original_architecture,
    original_to_diffusers_name,
)

Layout = Literal["diffusers", "wan"]
CONFIG = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
_STEM = "diffusion_pytorch_model"  # the weight files' name in both layouts
# diffusers 0.33.0 is the first release with WanTransformer3DModel, in the layout read and written
# here (condition_embedder, top-level scale_shift_table, norm_out without parameters); FLF2V's
# `pos_embed_seq_len` came in 0.34.0.
MIN_DIFFUSERS = "0.33.0"
MIN_DIFFUSERS_FLF2V = "0.34.0"
_ORIGINAL_PREFIX = "model.diffusion_model."  # single-file exports of the original weights
_ORIGINAL_KEYS = ("dim", "num_heads", "num_layers")


class DiffusersTooOld(PretrainedFormatError):
    """The installed diffusers predates the Wan layout this package reads and writes."""


def installed_diffusers_version() -> str | None:
    """The installed diffusers' version, None when it is not installed."""
    try:
        return metadata.version("diffusers")
    except metadata.PackageNotFoundError:
        return None


def require_diffusers(minimum: str = MIN_DIFFUSERS) -> None:
    """Raise DiffusersTooOld when an installed diffusers is older than `minimum` (none installed: fine,
    nothing here imports it)."""
    version = installed_diffusers_version()
    if version is not None and Version(version) < Version(minimum):
        raise DiffusersTooOld(
            f"diffusers {version} is installed; the Wan transformer layout needs diffusers>={minimum} "
            f"(pip install 'diffusers>={minimum}')"
        )


@dataclass(frozen=True)
class TensorSpec:
    """One stored tensor, from its file's header: its name in the file, shape and dtype."""

    file: Path
    stored_name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class WanFolder:
    """A Wan transformer folder: its layout, config.json and weight files (in reading order)."""

    directory: Path
    layout: Layout
    config: dict[str, Any]
    files: tuple[Path, ...]
    index: dict[str, str] | None = None  # a sharded folder's weight_map: stored name -> file name

    @property
    def config_path(self) -> Path:
        return self.directory / CONFIG


def _read_json(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise PretrainedFormatError(f"{path}: unreadable JSON ({error})") from None
    if not isinstance(document, dict):
        raise PretrainedFormatError(f"{path}: expected a JSON object")
    return document


def folder_layout(directory: Path, config: dict[str, Any]) -> Layout:
    """Which layout a config.json describes (raises PretrainedFormatError for neither)."""
    name = config.get("_class_name")
    if name == DIFFUSERS_CLASS:
        return "diffusers"
    if name not in (None, ORIGINAL_CLASS):
        raise PretrainedFormatError(
            f"{directory} is not a Wan transformer: {CONFIG} has _class_name {name!r}, expected "
            f"{DIFFUSERS_CLASS} (diffusers) or {ORIGINAL_CLASS} (original Wan)"
        )
    if all(key in config for key in _ORIGINAL_KEYS):
        return "wan"
    raise PretrainedFormatError(
        f"{directory} is not a Wan transformer: {CONFIG} has neither _class_name {DIFFUSERS_CLASS} "
        f"nor the original Wan keys ({', '.join(_ORIGINAL_KEYS)}, ...)"
    )


def _sharded(directory: Path, index_path: Path) -> tuple[tuple[Path, ...], dict[str, str]]:
    weight_map = _read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise PretrainedFormatError(f"{index_path}: no weight_map")
    files = tuple(directory / name for name in sorted(set(weight_map.values())))
    missing = [path.name for path in files if not path.is_file()]
    if missing:
        raise PretrainedFormatError(f"{index_path} lists shards that are missing: {', '.join(missing[:3])}")
    return files, weight_map


def _weight_files(directory: Path, layout: Layout) -> tuple[tuple[Path, ...], dict[str, str] | None]:
    if (directory / DIFFUSERS_INDEX).is_file():
        return _sharded(directory, directory / DIFFUSERS_INDEX)
    if (directory / DIFFUSERS_WEIGHTS).is_file():
        return (directory / DIFFUSERS_WEIGHTS,), None
    if layout == "diffusers":
        raise PretrainedFormatError(
            f"{directory} has no {DIFFUSERS_WEIGHTS} (nor shards with {DIFFUSERS_INDEX})"
        )
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return _sharded(directory, indexes[0])
    for pattern in (f"{_STEM}*.safetensors", "*.safetensors", f"{_STEM}*.pt*", "*.pth", "*.pt"):
        files = tuple(sorted(path for path in directory.glob(pattern) if path.is_file()))
        if files:
            return files, None
    raise PretrainedFormatError(f"{directory} holds no weights (*.safetensors, *.pth or *.pt)")


def open_folder(directory: str | Path) -> WanFolder:
    """Detect a Wan transformer folder's layout and weight files (raises PretrainedFormatError,
    naming what is missing; DiffusersTooOld for a diffusers folder under too old a diffusers)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PretrainedFormatError(f"{directory}: no such directory")
    if not (directory / CONFIG).is_file():
        raise PretrainedFormatError(f"{directory} is not a Wan transformer: no {CONFIG}")
    config = _read_json(directory / CONFIG)
    layout = folder_layout(directory, config)
    if layout == "diffusers":
        require_diffusers(MIN_DIFFUSERS_FLF2V if config.get("pos_embed_seq_len") else MIN_DIFFUSERS)
    files, index = _weight_files(directory, layout)
    return WanFolder(directory, layout, config, files, index)


def _torch_file(path: Path) -> dict[str, torch.Tensor]:
    """A .pth/.pt of plain tensors, memory-mapped (weights-only: nothing else is unpickled)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # UnpicklingError, RuntimeError, EOFError, zip errors: all mean the same
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PretrainedFormatError(f"{path}: not a weights-only torch file of tensors ({reason})") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise PretrainedFormatError(f"{path}: holds a {type(state).__name__}, not a flat dict of tensors")
    return state


def _file_specs(path: Path) -> list[TensorSpec]:
    if path.suffix == ".safetensors":
        try:
            specs = []
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    piece = handle.get_slice(name)
                    specs.append(TensorSpec(path, name, tuple(piece.get_shape()), piece.get_dtype()))
            return specs
        except (SafetensorError, OSError) as error:
            raise PretrainedFormatError(f"{path}: not a readable safetensors file ({error})") from None
    return [
        TensorSpec(path, name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
        for name, tensor in _torch_file(path).items()
    ]


def _our_name(folder: WanFolder, stored: str) -> str:
    """The diffusers name of a stored name; an unknown original name is marked (so a strict load
    reports it as unexpected, by the name the user sees in the file, and it never matches)."""
    if folder.layout == "diffusers":
        return stored
    try:
        return original_to_diffusers_name(stored.removeprefix(_ORIGINAL_PREFIX))
    except UnknownWeightName:
        return f"{stored} (not an original Wan weight name)"


def tensor_specs(folder: WanFolder) -> dict[str, TensorSpec]:
    """Every tensor of the folder by its diffusers name, from the file headers alone (no tensor data).

    Raises PretrainedFormatError for an unreadable or truncated file, a name stored twice, or an
    index that disagrees with its shards.
    """
    specs: dict[str, TensorSpec] = {}
    for path in folder.files:
        for spec in _file_specs(path):
            name = _our_name(folder, spec.stored_name)
            if name in specs:
                raise PretrainedFormatError(
                    f"{folder.directory}: {spec.stored_name} is stored twice ({specs[name].file.name}, {path.name})"
                )
            specs[name] = spec
    if folder.index is not None:
        stored = {spec.stored_name: spec.file.name for spec in specs.values()}
        if stored != folder.index:
            wrong = sorted(set(stored.items()) ^ set(folder.index.items()))[0][0]
            raise PretrainedFormatError(
                f"{folder.directory}: the index and the shards disagree about {wrong}"
            )
    return specs


def iter_tensors(folder: WanFolder) -> Iterator[tuple[str, torch.Tensor]]:
    """(diffusers name, tensor) for every tensor of the folder, one at a time, in a fixed order
    (files sorted by name, tensors in the order of `tensor_specs`): every rank sees the same order."""
    for path in folder.files:
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for stored in handle.keys():  # noqa: SIM118
                        yield _our_name(folder, stored), handle.get_tensor(stored)
            except (SafetensorError, OSError) as error:
                raise PretrainedFormatError(f"{path}: not a readable safetensors file ({error})") from None
        else:
            for stored, tensor in _torch_file(path).items():
                yield _our_name(folder, stored), tensor


def folder_architecture(folder: WanFolder) -> dict[str, object]:
    """ModelConfig fields (plus `out_channels`) of a folder, from its config.json (and, for the
    original layout, the image-embedding shapes in its headers)."""
    where = str(folder.config_path)
    try:
        if folder.layout == "diffusers":
            return diffusers_architecture(folder.config, where)
        specs = tensor_specs(folder).values()
        shapes = {spec.stored_name.removeprefix(_ORIGINAL_PREFIX): spec.shape for spec in specs}
        return original_architecture(folder.config, shapes, where)
    except PretrainedFormatError:
        raise
    except (TypeError, ValueError) as error:  # a value of the wrong type in config.json
        raise PretrainedFormatError(f"{where}: {error}") from None


class SafetensorsMapping(Mapping[str, torch.Tensor]):
    """An open safetensors file as a read-only mapping: each tensor is read when it is looked up,
    and `shape(name)` answers from the header (what the writers use to check before writing)."""

    def __init__(self, handle: Any):
        self._handle = handle
        self._names = list(handle.keys())
        self._known = set(self._names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._known:
            raise KeyError(name)
        return self._handle.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, from the header."""
        return tuple(self._handle.get_slice(name).get_shape())


@contextmanager
def open_safetensors(path: str | Path) -> Iterator[SafetensorsMapping]:
    """A safetensors file as a lazy mapping, for the duration of the block (PretrainedFormatError
    when it is not a readable safetensors file)."""
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as error:
        raise PretrainedFormatError(f"{path}: not a readable safetensors file ({error})") from None
    with handle:
        yield SafetensorsMapping(handle)
