"""The DeepSpeed engine of a run: its JSON config generated from `ParallelConfig` and a few plain
values, never hand-kept. The optimizer and its schedule come built (`sora_train.optim`)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..config import ParallelConfig


def use_bf16(precision: str) -> bool:
    """bf16 when asked for, or on `auto` when a CUDA device supports it; fp32 on CPU."""
    if precision == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return precision == "bf16"


def deepspeed_config(
    parallel: ParallelConfig, *, global_batch: int, micro_batch: int, accumulation: int, grad_clip: float,
    bf16: bool, load_universal: bool = False, largest_parameter: int = 0,
) -> dict:  # fmt: skip
    """The DeepSpeed config dict: `global_batch` samples per optimizer step over the data-parallel
    ranks, each taking `accumulation` micro-batches of `micro_batch` samples.

    `load_universal` reads a universal checkpoint (saved by a different number of ranks).
    Non-finite gradient norms discard the step on all ranks at every ZeRO stage and precision
    (in bf16 through `check_grad_overflow`; in fp32 DeepSpeed checks the clipping norm).
    """
    return {
        # DeepSpeed counts every rank as data-parallel; a sequence-parallel group shares its samples.
        "train_batch_size": global_batch * parallel.sequence_parallel,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": grad_clip,
        "bf16": {"enabled": bf16, "check_grad_overflow": True},
        "zero_optimization": zero_config(parallel, torch.cuda.is_available(), largest_parameter),
        "checkpoint": {"load_universal": load_universal},
        "zero_allow_untested_optimizer": True,
        # Offloading with torch's AdamW (on a machine without a GPU): allowed, if slower than DeepSpeed's.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def zero3_fetch_sizes(parallel: ParallelConfig, largest_parameter: int) -> tuple[int, int]:
    """(prefetch bucket, live parameters) in elements under ZeRO-3: the configured sizes, raised to
    the model's largest parameter, which ZeRO-3 could otherwise neither prefetch nor keep gathered
    (Wan 14B's FFN weights are 70.8M elements against the default 5e7 bucket)."""
    return (
        max(parallel.prefetch_bucket_size, largest_parameter),
        max(parallel.max_live_parameters, largest_parameter),
    )


def zero_config(parallel: ParallelConfig, on_gpu: bool, largest_parameter: int = 0) -> dict:
    """DeepSpeed's `zero_optimization` section for the ZeRO stage, offload and bucket settings
    (`largest_parameter`: elements of the model's largest parameter, see `zero3_fetch_sizes`)."""
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
    prefetch, live = zero3_fetch_sizes(parallel, largest_parameter)
    section.update({
        "stage3_prefetch_bucket_size": prefetch,
        "stage3_param_persistence_threshold": parallel.param_persistence_threshold,
        "stage3_max_live_parameters": live,
    })  # fmt: skip
    if parallel.offload_params:
        section["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    return section


def build_engine(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    config: dict,
    universal_info: dict,
):
    """Wrap `model` in a DeepSpeed engine with its optimizer, LR schedule and DeepSpeed `config`.

    `universal_info` is DeepSpeed's universal-checkpoint marker: every save carries it, so any
    checkpoint can later be converted for a different number of ranks.
    """
    import deepspeed

    model.universal_checkpoint_info = dict(universal_info)
    has_multihead = any(isinstance(module, nn.MultiheadAttention) for module in model.modules())
    if config["zero_optimization"]["stage"] == 3 and has_multihead:
        # nn.MultiheadAttention reads its out_proj weights without calling out_proj, which ZeRO-3's
        # per-module parameter fetching cannot follow once a checkpoint is loaded (a "tracing
        # error" on the second step after resuming); fetch each one whole, as one leaf module.
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, [nn.MultiheadAttention])
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule, config=config
    )
    return engine


def partitioned_construction(config: dict, enabled: bool) -> contextlib.AbstractContextManager:
    """A context in which modules are built already partitioned over the ranks (ZeRO-3's
    `zero.Init`), so no rank ever holds the whole model; a no-op unless `enabled`."""
    if not enabled:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.Init(config_dict_or_path=config)


def copy_from_rank0(parameter: nn.Parameter, tensor: torch.Tensor) -> None:
    """Set a ZeRO-3-partitioned `parameter` to rank 0's `tensor` (collective): the parameter is
    gathered, rank 0 writes it, and each rank keeps its new partition. Other ranks' `tensor` is
    not read. For streaming pretrained weights in one tensor at a time."""
    import deepspeed
    import torch.distributed as dist

    with deepspeed.zero.GatheredParameters([parameter], modifier_rank=0), torch.no_grad():
        if dist.get_rank() == 0:
            parameter.data.copy_(tensor)


def full_shape(parameter: nn.Parameter) -> torch.Size:
    """A parameter's whole shape, also when ZeRO-3 has partitioned it (its local tensor is empty)."""
    return getattr(parameter, "ds_shape", parameter.shape)


def full_numel(parameter: nn.Parameter) -> int:
    """A parameter's whole number of elements, also when ZeRO-3 has partitioned it."""
    return getattr(parameter, "ds_numel", parameter.numel())
