"""Activation checkpointing, applied to a model from outside (the model code stays plain)."""

from __future__ import annotations

import functools

from torch.utils.checkpoint import checkpoint

from ..models.denoiser import VideoDenoiser


def apply_activation_checkpointing(model: VideoDenoiser) -> None:
    """Recompute each DiT block's activations in the backward pass instead of storing them.

    The block's forward is wrapped in place, so parameter names (and checkpoints) are unchanged.
    """
    for block in model.dit.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
