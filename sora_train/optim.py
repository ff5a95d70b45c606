"""The optimizer and its schedule: AdamW with decoupled weight decay on matrices only, and a linear
warmup followed by a cosine decay."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices (decayed) and norms, biases and other 1-D parameters (not decayed); a
    group with no parameter (LoRA trains matrices only) is left out, as DeepSpeed drops it too."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def build_optimizer(model: nn.Module, optim: OptimConfig, offloaded: bool = False) -> torch.optim.Optimizer:
    """AdamW over `model`'s trainable parameters.

    With the optimizer state `offloaded` to CPU next to a GPU, DeepSpeed's vectorised CPU Adam (AdamW
    mode) does the step; otherwise torch's (fused on a GPU).
    """
    groups = parameter_groups(model, optim.weight_decay)
    betas = tuple(optim.betas)
    if offloaded and torch.cuda.is_available():
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=optim.lr, betas=betas, eps=optim.eps, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=betas, eps=optim.eps, fused=torch.cuda.is_available())


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to `min_ratio` at `max_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_schedule(
    optimizer: torch.optim.Optimizer, optim: OptimConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """`warmup_cosine` over `max_steps` optimizer steps, as a scheduler stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, optim.warmup_steps, max_steps, optim.min_lr_ratio)
    )
