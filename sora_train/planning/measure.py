"""Measuring on CPU what the activation model is checked against: bytes autograd saves for backward."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..flops import (
    frozen_text_width,
    planned_latent_channels,
    planning_model,
)


@dataclass(frozen=True)
class SavedBytes:
    """Bytes autograd saved for backward in one forward: unique storages, parameters excluded."""

    total: int
    blocks: tuple[int, ...]  # per DiT block: what it saved beyond its inputs


def measure_saved_bytes(
    denoiser: torch.nn.Module, x0: torch.Tensor, text: torch.Tensor, mask: torch.Tensor
) -> SavedBytes:
    """Saved-for-backward bytes of one training forward (denoiser and flow-matching loss), with
    `torch.autograd.graph.saved_tensors_hooks`."""
    from ..diffusion.flow import flow_loss

    params = {p.untyped_storage().data_ptr() for p in denoiser.parameters()}
    blocks = list(denoiser.dit.blocks)
    current: list[int | None] = [None]
    inputs: set[int] = set()  # storages of the running block's inputs
    seen: dict[int, int] = {}
    per_block: list[dict[int, int]] = [{} for _ in blocks]

    def enter(index: int):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            current[0] = index
            inputs.clear()
            inputs.update(a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor))

        return hook

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        pointer, size = tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()
        if pointer not in params:
            seen[pointer] = size
            if current[0] is not None and pointer not in inputs:
                per_block[current[0]][pointer] = size
        return tensor

    handles = [block.register_forward_pre_hook(enter(i)) for i, block in enumerate(blocks)]
    handles += [block.register_forward_hook(lambda *_: current.__setitem__(0, None)) for block in blocks]
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=generator).to(x0.dtype)
    t = torch.rand(x0.shape[0], generator=generator).to(x0.dtype)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            flow_loss(lambda x_t, t_: denoiser(x_t, t_, text, mask), x0, noise, t)
    finally:
        for handle in handles:
            handle.remove()
    return SavedBytes(total=sum(seen.values()), blocks=tuple(sum(b.values()) for b in per_block))


@dataclass(frozen=True)
class MeasuredActivations:
    """Activation bytes measured on CPU: the counterparts of `activation_bytes(...).saved`."""

    saved: int  # without checkpointing: everything saved at once
    checkpointed: int  # the checkpointed forward's saved bytes + `block` (recomputed during backward)
    block: int  # the most one block saves beyond its inputs


def measure_activation_bytes(
    model: ModelConfig, batch: int, clip: tuple[int, int, int], dtype: torch.dtype
) -> MeasuredActivations:
    """Saved-for-backward bytes of `model` on CPU for `batch` latent clips of (f, h, w)
    frames/height/width, without and with activation checkpointing."""
    from ..models.denoiser import build_tokenizer
    from ..parallel.checkpointing import apply_activation_checkpointing

    torch.manual_seed(0)
    denoiser = planning_model(model, device="cpu").to(dtype)
    x0 = torch.randn(batch, planned_latent_channels(model), *clip).to(dtype)
    if model.text_encoder == "learned":
        text, mask = build_tokenizer(model)(["a red square moving left"] * batch)
    else:
        text = torch.randn(batch, model.text_max_length, frozen_text_width(model)).to(dtype)
        mask = torch.ones(batch, model.text_max_length, dtype=torch.bool)
    whole = measure_saved_bytes(denoiser, x0, text, mask)
    apply_activation_checkpointing(denoiser)
    block = max(whole.blocks)
    checkpointed = measure_saved_bytes(denoiser, x0, text, mask).total + block
    return MeasuredActivations(saved=whole.total, checkpointed=checkpointed, block=block)
