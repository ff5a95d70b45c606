"""Activation checkpointing policies, applied to a model's transformer blocks from outside.

Policies (`train.activation_checkpointing`):

- `none`: every block keeps what autograd saves for backward.
- `full`: every block keeps only its inputs and recomputes its forward during backward.
- `every_k`: blocks 0, k, 2k, ... (k = `train.activation_checkpointing_every`) are checkpointed
  as under `full`, the others keep everything; k = 1 is `full`.
- `selective`: every block keeps the outputs of its matmuls (`mm`, `addmm`) and of its fused
  attention kernels, and recomputes the pointwise ops between them (norms, adaLN modulation,
  GELU, RoPE, gates, residual adds) during backward (torch's selective activation checkpointing).
  Batched matmuls (`bmm`) are recomputed: the blocks' own projections run as `mm`/`addmm`, and a
  `bmm` is the math attention backend's score matrix, which grows with the square of the tokens.

A block's `forward` is wrapped in place with non-reentrant checkpointing, which takes any
number of tensor and non-tensor arguments and returns tuples (MM-DiT blocks), so parameter
names and state-dict keys are unchanged. Compile blocks after this (`parallel/compile.py`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal, get_args

import torch
from torch.utils.checkpoint import (
    CheckpointPolicy,
    SelectiveCheckpointContext,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from ..models.denoiser import VideoDenoiser

# `train.activation_checkpointing`: the policies this module applies (see the module docstring).
ActivationCheckpointPolicy = Literal["none", "full", "every_k", "selective"]
POLICIES: tuple[ActivationCheckpointPolicy, ...] = get_args(ActivationCheckpointPolicy)

aten = torch.ops.aten
SAVED_OPS = frozenset({
    aten.mm.default,
    aten.addmm.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
})  # fmt: skip


def checkpointed_blocks(policy: ActivationCheckpointPolicy, depth: int, every: int = 2) -> tuple[int, ...]:
    """Indices of the blocks `policy` wraps in a checkpoint (`every`: k of `every_k`)."""
    if policy not in POLICIES:
        raise ValueError(
            f"activation checkpointing policy must be one of {', '.join(POLICIES)}, got {policy!r}"
        )
    if every < 1:
        raise ValueError(f"every_k needs every >= 1, got {every}")
    if policy == "none":
        return ()
    return tuple(range(0, depth, every if policy == "every_k" else 1))


def selective_policy(
    ctx: SelectiveCheckpointContext, op: torch._ops.OpOverload, *args: Any, **kwargs: Any
) -> CheckpointPolicy:
    """Keep the outputs of `SAVED_OPS`, recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpointed(forward: Callable[..., Any], selective: bool) -> Callable[..., Any]:
    """`forward` run under non-reentrant checkpointing (selective: under `selective_policy`).

    A function of this module rather than a `functools.partial` of `checkpoint`: torch.compile
    starts tracing at the first frame outside torch, and `checkpoint` itself is excluded from
    tracing, so a compiled block must enter through here to capture the checkpoint in its graph."""
    context_fn = functools.partial(create_selective_checkpoint_contexts, selective_policy)
    options = {"context_fn": context_fn} if selective else {}

    def run(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(forward, *args, use_reentrant=False, **options, **kwargs)

    return run


def apply_activation_checkpointing(
    model: VideoDenoiser, policy: ActivationCheckpointPolicy, every: int = 2
) -> None:
    """Checkpoint `model.dit.blocks` under `policy` (one of `POLICIES`; `every`: k of `every_k`)."""
    for index in checkpointed_blocks(policy, len(model.dit.blocks), every):
        block = model.dit.blocks[index]
        block.forward = _checkpointed(block.forward, selective=policy == "selective")
