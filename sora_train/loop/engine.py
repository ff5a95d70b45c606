"""The DeepSpeed engine a run trains: how the global batch splits over ranks and micro-batches, the
optimizer and schedule, the DeepSpeed config."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..checkpoint.universal import UNIVERSAL_INFO
from ..config import TrainConfig
from ..optim import build_optimizer, build_schedule
from ..parallel.zero import build_engine, deepspeed_config, full_numel, use_bf16


@dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step's global batch is split: each of `data_world` data-parallel ranks
    runs `accumulation` micro-batches of `micro_batch` samples."""

    data_world: int
    accumulation: int
    micro_batch: int


def batch_layout(cfg: TrainConfig, data_world: int, accumulation: int | None = None) -> BatchLayout:
    """The layout of `cfg`'s global batch on `data_world` data-parallel ranks, with the configured
    accumulation or, after a resume on a different number of ranks, the one the resume derived."""
    accumulation = accumulation or cfg.train.grad_accum_steps
    micro_batch = cfg.train.global_batch_size // (data_world * accumulation)
    return BatchLayout(data_world=data_world, accumulation=accumulation, micro_batch=micro_batch)


def engine_config(
    cfg: TrainConfig, layout: BatchLayout, load_universal: bool = False, largest_parameter: int = 0
) -> dict:
    """The DeepSpeed config of this run: `cfg.parallel`'s ZeRO settings for `layout`'s batches;
    `load_universal` when resuming from a checkpoint saved by a different number of ranks;
    `largest_parameter` (elements) sizes ZeRO-3's fetching (`parallel.zero.zero3_fetch_sizes`)."""
    return deepspeed_config(
        cfg.parallel, global_batch=cfg.train.global_batch_size, micro_batch=layout.micro_batch,
        accumulation=layout.accumulation, grad_clip=cfg.train.grad_clip, bf16=use_bf16(cfg.train.precision),
        load_universal=load_universal, largest_parameter=largest_parameter,
    )  # fmt: skip


def training_engine(model: nn.Module, cfg: TrainConfig, layout: BatchLayout, load_universal: bool = False):
    """`model` in a DeepSpeed engine with AdamW over its trainable parameters, the warmup-cosine
    schedule and `engine_config`'s ZeRO settings."""
    optimizer = build_optimizer(model, cfg.optim, offloaded=cfg.parallel.offload_optimizer)
    schedule = build_schedule(optimizer, cfg.optim, cfg.train.max_steps)
    largest = max(full_numel(p) for p in model.parameters())
    config = engine_config(cfg, layout, load_universal, largest_parameter=largest)
    return build_engine(model, optimizer, schedule, config, UNIVERSAL_INFO)
