"""A whole diffusers `WanPipeline` folder: the trained transformer beside the run's VAE, text encoder,
tokenizer and a flow-matching scheduler, so `WanPipeline.from_pretrained(out)` generates videos.

The VAE and the text encoder are copied from the run's local `model.vae_path` and
`model.text_encoder_path` (the tokenizer files of the latter go to tokenizer/); the scheduler is
diffusers' FlowMatchEulerDiscreteScheduler with the run's `diffusion.sample_shift` (1.0 when unset),
the schedule `sora-sample` uses. Text-to-video only: an image-to-video pipeline also needs the CLIP
image encoder, which a run does not have.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .loading import DIT_PREFIX
from .reading import MIN_DIFFUSERS, PretrainedFormatError, installed_diffusers_version, require_diffusers
from .wan_layout import diffusers_config
from .writing import DEFAULT_MAX_SHARD_BYTES, prepare, staged_directory, write_folder

# Files of a transformers tokenizer (they go to tokenizer/; everything else of the encoder to text_encoder/).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model",
                    "added_tokens.json", "vocab.json", "merges.txt")  # fmt: skip
_ENCODER_CLASSES = {"t5": "T5EncoderModel", "umt5": "UMT5EncoderModel"}
SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"


def _check_pipeline_model(model_config: Any) -> None:
    if model_config.latent_space != "wan" or model_config.text_encoder not in _ENCODER_CLASSES:
        raise PretrainedFormatError(
            "--format diffusers-pipeline needs model.latent_space=wan and model.text_encoder=t5|umt5 (the "
            f"pipeline's VAE and text encoder), got {model_config.latent_space} and {model_config.text_encoder}"
        )
    if model_config.image_dim is not None:
        raise PretrainedFormatError(
            "--format diffusers-pipeline writes a text-to-video WanPipeline; an image-to-video model also "
            "needs a CLIP image encoder (export --format diffusers and assemble WanImageToVideoPipeline)"
        )
    for path in (model_config.vae_path, model_config.text_encoder_path):
        if not (Path(path) / "config.json").is_file():
            raise PretrainedFormatError(f"{path}: no config.json (the run's pretrained part is not there)")


def _copy_files(source: Path, target: Path, keep: Callable[[str], bool]) -> None:
    """Copy the files of `source` whose name `keep` accepts into a new directory `target`."""
    target.mkdir()
    for path in sorted(source.iterdir()):
        if path.is_file() and keep(path.name):
            shutil.copyfile(path, target / path.name)


def _model_index(model_config: Any, tokenizer_dir: Path, version: str) -> dict[str, object]:
    tokenizer_config = tokenizer_dir / "tokenizer_config.json"
    tokenizer_class = "AutoTokenizer"
    if tokenizer_config.is_file():
        tokenizer_class = json.loads(tokenizer_config.read_text()).get("tokenizer_class") or tokenizer_class
    return {
        "_class_name": "WanPipeline",
        "_diffusers_version": version,
        "boundary_ratio": None,
        "expand_timesteps": False,
        "scheduler": ["diffusers", SCHEDULER_CLASS],
        "text_encoder": ["transformers", _ENCODER_CLASSES[model_config.text_encoder]],
        "tokenizer": ["transformers", tokenizer_class],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": [None, None],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }


def write_diffusers_pipeline(
    weights: Mapping[str, torch.Tensor],
    model_config: Any,
    sample_shift: float | None,
    out: str | Path,
    prefix: str = DIT_PREFIX,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a `WanPipeline` folder: transformer/ (these weights), vae/, text_encoder/, tokenizer/ (from
    the config's local paths), scheduler/ and model_index.json. Raises PretrainedFormatError before
    anything is written when the model cannot make such a pipeline."""
    require_diffusers()
    _check_pipeline_model(model_config)
    version = installed_diffusers_version() or MIN_DIFFUSERS
    config, names = prepare(weights, model_config, prefix, diffusers_config)
    encoder = Path(model_config.text_encoder_path)
    with staged_directory(out) as staging:
        (staging / "transformer").mkdir()
        write_folder(staging / "transformer", config, weights, names, lambda name: name, max_shard_bytes)
        _copy_files(Path(model_config.vae_path), staging / "vae", lambda name: True)
        _copy_files(encoder, staging / "text_encoder", lambda name: name not in _TOKENIZER_FILES)
        _copy_files(encoder, staging / "tokenizer", lambda name: name in _TOKENIZER_FILES)
        scheduler = {"_class_name": SCHEDULER_CLASS, "_diffusers_version": version, "num_train_timesteps": 1000,
                     "shift": 1.0 if sample_shift is None else float(sample_shift)}  # fmt: skip
        (staging / "scheduler").mkdir()
        (staging / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
        index = _model_index(model_config, staging / "tokenizer", version)
        (staging / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return Path(out)
