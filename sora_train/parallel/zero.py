"""The DeepSpeed engine for a run: its JSON config generated from `TrainConfig`, never hand-kept."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ParallelConfig, TrainConfig, micro_batch_size


def use_bf16(cfg: TrainConfig) -> bool:
    """bf16 when asked for, or on `auto` when a CUDA device supports it; fp32 on CPU."""
    if cfg.train.precision == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return cfg.train.precision == "bf16"


def deepspeed_config(cfg: TrainConfig, world_size: int, load_universal: bool = False) -> dict:
    """The DeepSpeed config dict for this run and world size.

    `load_universal` reads a universal checkpoint (saved by a different number of ranks).
    Non-finite gradient norms discard the step on all ranks at every ZeRO stage and precision
    (in bf16 through `check_grad_overflow`; in fp32 DeepSpeed checks the clipping norm).
    """
    on_gpu = torch.cuda.is_available()
    return {
        # DeepSpeed counts every rank as data-parallel; a sequence-parallel group shares its samples.
        "train_batch_size": cfg.train.global_batch_size * cfg.parallel.sequence_parallel,
        "train_micro_batch_size_per_gpu": micro_batch_size(cfg, world_size),
        "gradient_accumulation_steps": cfg.train.grad_accum_steps,
        "gradient_clipping": cfg.train.grad_clip,
        "bf16": {"enabled": use_bf16(cfg), "check_grad_overflow": True},
        "zero_optimization": zero_config(cfg.parallel, on_gpu),
        "checkpoint": {"load_universal": load_universal},
        "zero_allow_untested_optimizer": True,
        # Offloading with torch's AdamW (on a machine without a GPU): allowed, if slower than DeepSpeed's.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def zero_config(parallel: ParallelConfig, on_gpu: bool) -> dict:
    """DeepSpeed's `zero_optimization` section for the ZeRO stage, offload and bucket settings."""
    overlap = on_gpu if parallel.overlap_comm == "auto" else parallel.overlap_comm == "true"
    section = {
        "stage": parallel.zero_stage,
        "overlap_comm": overlap,
        "contiguous_gradients": True,
        "reduce_bucket_size": parallel.reduce_bucket_size,
    }
    if parallel.offload_optimizer:
        section["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if parallel.zero_stage < 3:
        section["allgather_bucket_size"] = parallel.allgather_bucket_size
        return section
    section.update({
        "stage3_prefetch_bucket_size": parallel.prefetch_bucket_size,
        "stage3_param_persistence_threshold": parallel.param_persistence_threshold,
        "stage3_max_live_parameters": parallel.max_live_parameters,
    })  # fmt: skip
    if parallel.offload_params:
        section["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    return section


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on norms, biases or 1-D parameters).

    With the optimizer offloaded next to a GPU, DeepSpeed's vectorised CPU Adam (AdamW mode)
    does the step; otherwise torch's (fused on a GPU).
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.parallel.offload_optimizer and torch.cuda.is_available():
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(
            groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, adamw_mode=True
        )
    return torch.optim.AdamW(
        groups,
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
        fused=torch.cuda.is_available(),
    )


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to `min_ratio` at `max_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_engine(model: nn.Module, cfg: TrainConfig, world_size: int, load_universal: bool = False):
    """Wrap `model` in a DeepSpeed engine with AdamW and the warmup + cosine schedule.

    Every save carries DeepSpeed's universal-checkpoint marker, so any checkpoint can later be
    converted for a different number of ranks.
    """
    import deepspeed

    from ..checkpoint.universal import UNIVERSAL_INFO

    model.universal_checkpoint_info = dict(UNIVERSAL_INFO)
    if cfg.parallel.zero_stage == 3:
        # nn.MultiheadAttention reads its out_proj weights without calling out_proj, which ZeRO-3's
        # per-module parameter fetching cannot follow once a checkpoint is loaded (a "tracing
        # error" on the second step after resuming); fetch each one whole, as one leaf module.
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, [nn.MultiheadAttention])

    optimizer = build_optimizer(model, cfg)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine(step, cfg.optim.warmup_steps, cfg.train.max_steps, cfg.optim.min_lr_ratio),
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=schedule,
        config=deepspeed_config(cfg, world_size, load_universal),
    )
    return engine
