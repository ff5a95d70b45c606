"""sora-export: a checkpoint's weights as a folder sora-sample, diffusers or the original Wan code loads.

Formats (`--format`):
  native     model.safetensors + config.json, loadable by sora-sample (the default)
  diffusers  config.json + diffusion_pytorch_model*.safetensors that diffusers'
             `WanTransformer3DModel.from_pretrained` loads (model.variant=wan only)
  wan        the original Wan release's layout: its config.json and weight names (model.variant=wan only)
  diffusers-pipeline
             a whole WanPipeline folder: the transformer with the run's VAE, text encoder, tokenizer
             (from their local paths) and scheduler (model.variant=wan, text-to-video only)

A LoRA run (`model.lora.rank` > 0) holds only its adapters: `--format diffusers` writes them alone
as `pytorch_lora_weights.safetensors` in diffusers' keys, for `WanPipeline.load_lora_weights(DIR)`;
`--format native` writes them with the config (sora-sample adds the base weights from
`model.init_from`); `--merge` folds them into the base weights of `model.init_from` and writes the
whole merged model in any format (held in CPU memory while it is written).

`--weights ema` (default) takes the EMA weights the checkpoint holds; `--weights raw`
consolidates the DeepSpeed ZeRO shards (any stage) into full fp32 weights. The checkpoint's
manifest is verified first, and DeepSpeed's files are read with weights-only loads, so a file
this trainer did not write is never unpickled. Every export is written to a staging folder
beside --out and renamed into place: --out never holds a partial export.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Literal, get_args

import torch

from .checkpoint import CheckpointInvalid
from .checkpoint.resuming import newest_valid_checkpoint
from .checkpoint.safe_load import UnsafeCheckpoint, weights_only_loads
from .config import LoraConfig
from .models.lora import diffusers_lora_state, lora_spec, merged_weights
from .pretrained import (
    CONFIG_FILE,
    DEFAULT_MAX_SHARD_BYTES,
    EMA_WEIGHTS,
    EXPORT_WEIGHTS,
    InferenceConfig,
    load_model,
    read_config,
    save_weights,
    staged_directory,
    write_config,
    write_diffusers,
    write_wan,
)
from .pretrained.loading import DIT_PREFIX
from .pretrained.pipeline import write_diffusers_pipeline
from .pretrained.reading import iter_tensors, open_folder, open_safetensors

ExportFormat = Literal["native", "diffusers", "wan", "diffusers-pipeline"]
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the file WanPipeline.load_lora_weights(DIR) reads
WeightsChoice = Literal["ema", "raw"]
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*$", re.IGNORECASE)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory that verifies against its manifest, or a run dir's newest such one.

    Raises FileNotFoundError when there is none (naming what was wrong with each candidate).
    """
    try:
        selection = newest_valid_checkpoint(Path(path))
    except CheckpointInvalid as error:
        raise FileNotFoundError(str(error)) from error
    if selection.directory is None:
        raise FileNotFoundError(f"{path} is not a checkpoint nor a run dir with one")
    return selection.directory


def consolidated_weights(checkpoint: Path) -> dict:
    """Full fp32 weights gathered from the ZeRO shards of a checkpoint (weights-only loads)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with weights_only_loads():
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name))


@contextmanager
def checkpoint_weights(checkpoint: Path, weights: WeightsChoice) -> Iterator[Mapping[str, torch.Tensor]]:
    """The checkpoint's EMA weights (read lazily, one tensor at a time) or its consolidated raw weights."""
    if weights == "ema":
        with open_safetensors(checkpoint / EMA_WEIGHTS) as state:
            yield state
    else:
        yield consolidated_weights(checkpoint)


def _write_native(source: Path, staging: Path, weights: WeightsChoice) -> None:
    if weights == "ema":
        shutil.copyfile(source / EMA_WEIGHTS, staging / EXPORT_WEIGHTS)
    else:
        save_weights(staging / EXPORT_WEIGHTS, consolidated_weights(source))
    shutil.copyfile(source / CONFIG_FILE, staging / CONFIG_FILE)
    load_model(staging)  # proves the export loads (names and shapes match the config) before it is visible


def export(
    checkpoint: str | Path,
    out: str | Path,
    weights: WeightsChoice = "ema",
    format: ExportFormat = "native",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    merge: bool = False,
) -> Path:
    """Write a checkpoint's weights to `out` in `format`; returns `out`. `merge`: a LoRA run's
    adapters folded into its base weights (see the module docstring).

    Raises ValueError (a bad choice, a model diffusers/wan cannot hold, weights that do not fit the
    config: PretrainedFormatError), FileNotFoundError (no valid checkpoint), FileExistsError (a
    non-empty `out`); nothing is left at `out` after an error.
    """
    if weights not in get_args(WeightsChoice):
        raise ValueError(f"--weights must be ema or raw, got {weights!r}")
    if format not in get_args(ExportFormat):
        raise ValueError(f"--format must be one of {', '.join(get_args(ExportFormat))}, got {format!r}")
    source = resolve_checkpoint(checkpoint)
    inference = read_config(source)
    lora = inference.model.lora.enabled
    if merge and not lora:
        raise ValueError(f"--merge is for LoRA runs; {source.name} trained every weight (drop --merge)")
    if lora and merge:
        with checkpoint_weights(source, weights) as adapters:
            merged, plain = merged_lora(inference, dict(adapters))
        return write_format(merged, plain, format, out, max_shard_bytes, source)
    if lora and format != "native":
        return export_adapters(source, inference, weights, format, out)
    if format == "native":
        with staged_directory(out) as staging:
            _write_native(source, staging, weights)
        return Path(out)
    with checkpoint_weights(source, weights) as state:
        return write_format(state, inference, format, out, max_shard_bytes, source)


def write_format(
    state: Mapping[str, torch.Tensor], inference: InferenceConfig, format: ExportFormat, out: str | Path,
    max_shard_bytes: int, source: Path,
) -> Path:  # fmt: skip
    """Whole-model `state` (`dit.` + diffusers names) written in `format` for `inference.model`."""
    model = inference.model
    if format == "native":
        with staged_directory(out) as staging:
            save_weights(staging / EXPORT_WEIGHTS, dict(state))
            write_config(staging, inference)
            load_model(staging)  # proves the export loads before it is visible
        return Path(out)
    if model.variant != "wan":
        raise ValueError(
            f"--format {format} needs a model.variant=wan checkpoint; {source.name} holds model.variant="
            f"{model.variant} (use --format native)"
        )
    if format == "diffusers-pipeline":
        shift = inference.diffusion.sample_shift
        return write_diffusers_pipeline(state, model, shift, out, max_shard_bytes=max_shard_bytes)
    writer = write_diffusers if format == "diffusers" else write_wan
    return writer(state, model, out, max_shard_bytes=max_shard_bytes)


def export_adapters(
    source: Path, inference: InferenceConfig, weights: WeightsChoice, format: ExportFormat, out: str | Path
) -> Path:
    """A LoRA run's adapters alone, in diffusers' keys (`--format diffusers`); other formats need --merge."""
    if format != "diffusers":
        raise ValueError(
            f"{source.name} is a LoRA run: --format {format} holds whole models, so add --merge; or write "
            "the adapters alone with --format diffusers (or native)"
        )
    lora = inference.model.lora
    scale = lora_spec(inference.model.variant, lora.rank, lora.alpha, lora.dropout, lora.targets).scale
    with checkpoint_weights(source, weights) as adapters, staged_directory(out) as staging:
        save_weights(staging / LORA_WEIGHTS, diffusers_lora_state(dict(adapters), scale))
    return Path(out)


def merged_lora(
    inference: InferenceConfig, adapters: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], InferenceConfig]:
    """The base weights of `model.init_from` with the adapters folded in, and the inference config of
    that plain model (no LoRA)."""
    model = inference.model
    lora = model.lora
    scale = lora_spec(model.variant, lora.rank, lora.alpha, lora.dropout, lora.targets).scale
    base = ((DIT_PREFIX + name, tensor) for name, tensor in iter_tensors(open_folder(model.init_from)))
    plain = replace(inference, model=replace(model, lora=LoraConfig()))
    return merged_weights(base, adapters, scale), plain


def parse_size(text: str) -> int:
    """Bytes from '5GB', '500MB', '64KB' or a plain number of bytes (powers of 1024)."""
    match = _SIZE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB)")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[match[2].upper().rstrip("B")]
    return max(1, int(float(match[1]) * scale))


def main(argv: list[str] | None = None) -> int:
    """Entry point of `sora-export`."""
    parser = argparse.ArgumentParser(prog="sora-export", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "checkpoint", help="a checkpoint directory, or a run dir (its newest valid checkpoint)"
    )
    parser.add_argument("--out", required=True, help="a new (or empty) directory for the export")
    parser.add_argument("--weights", choices=get_args(WeightsChoice), default="ema")
    parser.add_argument("--format", choices=get_args(ExportFormat), default="native")
    parser.add_argument(
        "--max-shard-size", type=parse_size, default=DEFAULT_MAX_SHARD_BYTES,
        help="diffusers/wan: split the safetensors into shards of at most this size (default 5GB)",
    )  # fmt: skip
    parser.add_argument(
        "--merge", action="store_true", help="LoRA runs: fold the adapters into model.init_from's weights"
    )
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, args.weights, args.format, args.max_shard_size, args.merge)
    except (FileNotFoundError, FileExistsError, ValueError, CheckpointInvalid, UnsafeCheckpoint) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported {args.weights} weights to {out} ({args.format})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
