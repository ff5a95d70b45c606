"""Inference bundles: a model's weights (safetensors) beside a config.json that rebuilds it.

Written by `sora-export` and into every checkpoint; read by `sora-sample` and evaluation.
Nothing here unpickles: weights are safetensors, configs are JSON.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..config import DiffusionConfig, ModelConfig, TrainConfig
from ..models.denoiser import VideoDenoiser, build_denoiser
from ..options import dataclass_from_dict

CONFIG_FILE = "config.json"
EXPORT_WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "ema.safetensors"


@dataclass
class InferenceConfig:
    """What sampling needs: the model, the clip shape it was trained on, the sampler settings."""

    model: ModelConfig
    num_frames: int
    height: int
    width: int
    fps: float
    diffusion: DiffusionConfig

    @property
    def clip_shape(self) -> tuple[int, int, int]:
        return self.num_frames, self.height, self.width


def inference_config(cfg: TrainConfig) -> InferenceConfig:
    """The inference config of a training run; clips play back at the source fps / frame stride."""
    return InferenceConfig(
        model=cfg.model,
        num_frames=cfg.data.num_frames,
        height=cfg.data.height,
        width=cfg.data.width,
        fps=cfg.data.fps / cfg.data.frame_stride,
        diffusion=cfg.diffusion,
    )


def write_config(directory: Path, config: InferenceConfig) -> None:
    """Write config.json."""
    (directory / CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2) + "\n")


def read_config(directory: Path) -> InferenceConfig:
    """Read config.json back into dataclasses."""
    raw = json.loads((directory / CONFIG_FILE).read_text())
    model = dataclass_from_dict(ModelConfig, raw.pop("model"))
    return InferenceConfig(
        model=model, diffusion=dataclass_from_dict(DiffusionConfig, raw.pop("diffusion")), **raw
    )


def save_weights(path: Path, weights: dict[str, torch.Tensor]) -> None:
    """Write a state dict as safetensors (contiguous CPU tensors)."""
    save_file({k: v.detach().to("cpu").contiguous() for k, v in weights.items()}, str(path))


def load_model(
    directory: str | Path, weights_file: str | None = None
) -> tuple[VideoDenoiser, InferenceConfig]:
    """Rebuild the model from an export or a checkpoint directory and load its weights (eval mode, CPU).

    By default an export's model.safetensors, else a checkpoint's EMA weights.
    """
    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG_FILE}; pass an export or a checkpoint directory")
    if weights_file is None:
        weights_file = EXPORT_WEIGHTS if (directory / EXPORT_WEIGHTS).is_file() else EMA_WEIGHTS
    path = directory / weights_file
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    config = read_config(directory)
    try:
        model = assemble_model(config.model, load_file(str(path)))
    except WeightsDoNotMatch as error:
        raise ValueError(f"{path} does not match the model in {CONFIG_FILE}: {error}") from error
    return model.eval(), config


class WeightsDoNotMatch(ValueError):
    """Weights whose names are not the parameters the model config describes."""


def assemble_model(config: ModelConfig, weights: dict[str, torch.Tensor]) -> VideoDenoiser:
    """The model `config` describes holding `weights`: every parameter, or with LoRA (`config.lora`)
    the adapters, added to the base weights read from `config.init_from` (raises WeightsDoNotMatch)."""
    model = build_denoiser(config)
    if config.lora.enabled:
        from ..models.lora import apply_lora, lora_spec
        from .loading import load_pretrained

        load_pretrained(model, config.init_from)
        lora = config.lora
        apply_lora(model, lora_spec(config.variant, lora.rank, lora.alpha, lora.dropout, lora.targets))
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise WeightsDoNotMatch(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.load_state_dict(weights, strict=False)  # with LoRA the frozen base came from init_from
    return model
