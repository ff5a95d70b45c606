"""Weights in and out: inference bundles, and Wan transformer folders in two layouts.

- `bundle`: a model's weights (safetensors) beside a config.json that rebuilds it; written by
  `sora-export --format native` and into every checkpoint, read by `sora-sample` and evaluation.
- `wan_layout`: diffusers' names <-> the original Wan release's names, and their config.json files
  <-> ModelConfig fields.
- `reading`: what a folder is (diffusers or original Wan) and its tensors, one at a time.
- `loading`: `load_pretrained` (strict, streaming, checked before anything is copied) and the
  architecture check `model.init_from` uses.
- `writing`: `write_diffusers` / `write_wan`, staged and renamed into place.
- `pipeline`: `write_diffusers_pipeline`, a whole WanPipeline folder (transformer, VAE, text encoder,
  tokenizer, scheduler).

Nothing here unpickles: weights are safetensors (or weights-only, memory-mapped .pth), configs JSON.
"""

from .bundle import (
    CONFIG_FILE,
    EMA_WEIGHTS,
    EXPORT_WEIGHTS,
    InferenceConfig,
    WeightsDoNotMatch,
    assemble_model,
    inference_config,
    load_model,
    read_config,
    save_weights,
    write_config,
)
from .loading import (
    DIT_PREFIX,
    ArchitectureMismatch,
    CopyFn,
    LoadedWeights,
    WeightsMismatch,
    architecture,
    check_architecture,
    load_pretrained,
)
from .pipeline import write_diffusers_pipeline
from .reading import MIN_DIFFUSERS, DiffusersTooOld, PretrainedFormatError, open_folder
from .writing import DEFAULT_MAX_SHARD_BYTES, WeightsDoNotFit, staged_directory, write_diffusers, write_wan

__all__ = [
    "CONFIG_FILE",
    "DEFAULT_MAX_SHARD_BYTES",
    "DIT_PREFIX",
    "EMA_WEIGHTS",
    "EXPORT_WEIGHTS",
    "MIN_DIFFUSERS",
    "ArchitectureMismatch",
    "CopyFn",
    "DiffusersTooOld",
    "InferenceConfig",
    "LoadedWeights",
    "PretrainedFormatError",
    "WeightsDoNotFit",
    "WeightsDoNotMatch",
    "WeightsMismatch",
    "architecture",
    "assemble_model",
    "check_architecture",
    "inference_config",
    "load_model",
    "load_pretrained",
    "open_folder",
    "read_config",
    "save_weights",
    "staged_directory",
    "write_config",
    "write_diffusers",
    "write_diffusers_pipeline",
    "write_wan",
]
