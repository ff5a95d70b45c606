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

from .config import DiffusionConfig, ModelConfig, TrainConfig
from .models.denoiser import VideoDenoiser, build_denoiser

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
    return InferenceConfig(
        model=ModelConfig(**raw.pop("model")), diffusion=DiffusionConfig(**raw.pop("diffusion")), **raw
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
    model = build_denoiser(config.model)
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the model in {CONFIG_FILE}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model.eval(), config
