"""Measuring on CPU what the activation model is checked against: bytes kept for backward.

A forward runs under `torch.autograd.graph.saved_tensors_hooks`, which sees every tensor autograd
saves, and under a dispatch mode that remembers which op created each storage. The kept bytes are
the unique storages saved for backward, plus the storages created in the forward that are still
alive when it ends (what selective checkpointing caches outside autograd's saved tensors);
parameters and the loss are excluded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch._ops import OpOverload
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..config import ModelConfig
from ..flops import (
    frozen_text_width,
    lora_targets,
    planned_latent_channels,
    planning_model,
)
from ..models.lora import LoraSpec, apply_lora
from ..parallel.checkpointing import POLICIES, SAVED_OPS, apply_activation_checkpointing, checkpointed_blocks


@dataclass(frozen=True)
class SavedBytes:
    """Bytes one forward keeps for backward: unique storages, parameters excluded."""

    total: int
    blocks: tuple[int, ...]  # per transformer block: what it saved beyond its inputs
    kept: tuple[int, ...]  # per block: of `blocks`, the outputs of the ops selective checkpointing keeps


class _Producers(TorchDispatchMode):
    """Remembers the op that created each storage, with a weak reference to tell when it is freed."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, tuple[OpOverload, StorageWeakRef, int]] = {}  # pointer -> (op, ref, bytes)

    def __torch_dispatch__(
        self, func: OpOverload, types: tuple, args: tuple = (), kwargs: dict | None = None
    ):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                known = self.storages.get(storage.data_ptr())
                if known is None or known[1].expired():  # a new storage (a freed one's address may be reused)
                    self.storages[storage.data_ptr()] = (func, StorageWeakRef(storage), storage.nbytes())
        return out

    def op(self, pointer: int) -> OpOverload | None:
        """The op that created the (live) storage at `pointer`; None if created outside the mode."""
        known = self.storages.get(pointer)
        return known[0] if known else None

    def alive(self) -> dict[int, int]:
        """Pointer -> bytes of the storages created under the mode that are still allocated."""
        return {pointer: size for pointer, (_, ref, size) in self.storages.items() if not ref.expired()}


def measure_saved_bytes(
    denoiser: torch.nn.Module,
    x0: torch.Tensor,
    text: torch.Tensor,
    mask: torch.Tensor,
    frame_mask: torch.Tensor | None = None,
) -> SavedBytes:
    """Bytes one training forward (denoiser and flow-matching loss) keeps for backward; `frame_mask`
    (B, f) bool: the latent frames kept clean (frame conditioning), as the trainer passes it."""
    from ..diffusion.flow import flow_loss

    params = {p.untyped_storage().data_ptr() for p in denoiser.parameters()}
    blocks = list(denoiser.dit.blocks)
    current: list[int | None] = [None]
    inputs: set[int] = set()  # storages of the running block's inputs
    seen: dict[int, tuple[StorageWeakRef, int]] = {}  # pointer -> (reference, bytes)
    per_block: list[dict[int, tuple[StorageWeakRef, int]]] = [{} for _ in blocks]

    def enter(index: int):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            current[0] = index
            inputs.clear()
            leaves = tree_leaves(args)  # tensors in tuples too (the RoPE table)
            inputs.update(a.untyped_storage().data_ptr() for a in leaves if isinstance(a, torch.Tensor))

        return hook

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
            if current[0] is not None and storage.data_ptr() not in inputs:
                per_block[current[0]][storage.data_ptr()] = seen[storage.data_ptr()]
        return tensor

    handles = [block.register_forward_pre_hook(enter(i)) for i, block in enumerate(blocks)]
    handles += [block.register_forward_hook(lambda *_: current.__setitem__(0, None)) for block in blocks]
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=generator).to(x0.dtype)
    t = torch.rand(x0.shape[0], generator=generator).to(x0.dtype)
    producers = _Producers()
    try:
        with producers, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = flow_loss(
                lambda x_t, t_: denoiser(x_t, t_, text, mask, frame_mask), x0, noise, t, frame_mask
            )
    finally:
        for handle in handles:
            handle.remove()
    given = (x0, noise, t, text, mask, loss) + (() if frame_mask is None else (frame_mask,))
    outside = params | {x.untyped_storage().data_ptr() for x in given}
    kept = {**_alive(seen), **{p: size for p, size in producers.alive().items() if p not in outside}}
    block_saved = [_alive(b) for b in per_block]
    return SavedBytes(
        total=sum(kept.values()),
        blocks=tuple(sum(b.values()) for b in block_saved),
        kept=tuple(sum(size for p, size in b.items() if producers.op(p) in SAVED_OPS) for b in block_saved),
    )


def _alive(storages: dict[int, tuple[StorageWeakRef, int]]) -> dict[int, int]:
    """Pointer -> bytes of the storages not freed yet (a saved tensor whose graph node is gone is freed)."""
    return {pointer: size for pointer, (ref, size) in storages.items() if not ref.expired()}


@dataclass(frozen=True)
class MeasuredActivations:
    """Activation bytes measured on CPU: the counterparts of `activation_bytes(...).saved`."""

    saved: dict[str, int]  # policy -> kept by the forward + the most one block adds while recomputed
    whole: SavedBytes  # the forward without checkpointing


def measure_activation_bytes(
    model: ModelConfig,
    batch: int,
    clip: tuple[int, int, int],
    dtype: torch.dtype,
    policies: tuple[str, ...] = POLICIES,
    every: int = 2,
    timesteps_per_token: bool = False,
) -> MeasuredActivations:
    """Bytes `model` keeps for backward on CPU for `batch` latent clips of (f, h, w)
    frames/height/width under each activation checkpointing policy (`every`: k of every_k), with
    `model.lora`'s adapters when it has them (needs peft);
    `timesteps_per_token`: with a frame mask (the first latent frame clean), as frame-conditioned
    training passes it.

    A checkpointed block's tensors live again while it is recomputed in backward: the figure adds
    the most any checkpointed block saves beyond its inputs (and, under `selective`, beyond the
    outputs it kept), measured without checkpointing."""
    from ..models.denoiser import build_tokenizer

    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(batch, planned_latent_channels(model), *clip, generator=generator).to(dtype)
    if model.text_encoder == "learned":
        filling = " ".join(["word"] * model.text_max_length)  # the planner counts text_max_length tokens
        text, mask = build_tokenizer(model)([filling] * batch)
    else:
        text = torch.randn(batch, model.text_max_length, frozen_text_width(model)).to(dtype)
        mask = torch.ones(batch, model.text_max_length, dtype=torch.bool)
    frame_mask = None
    if timesteps_per_token:
        frame_mask = torch.zeros(batch, clip[0], dtype=torch.bool)
        frame_mask[:, 0] = True

    def denoiser(policy: str) -> torch.nn.Module:
        torch.manual_seed(0)
        built = planning_model(model, device="cpu")
        if model.lora.enabled:  # adapters on a frozen base, as the trainer applies them
            lora = model.lora
            apply_lora(built, LoraSpec(lora.rank, lora.alpha or lora.rank, lora.dropout, lora_targets(model)))
        built = built.to(dtype)
        apply_activation_checkpointing(built, policy, every)
        return built

    whole = measure_saved_bytes(denoiser("none"), x0, text, mask, frame_mask)
    saved = {}
    for policy in policies:
        kept = (
            whole if policy == "none" else measure_saved_bytes(denoiser(policy), x0, text, mask, frame_mask)
        )
        live_again = [
            whole.blocks[i] - (whole.kept[i] if policy == "selective" else 0)
            for i in checkpointed_blocks(policy, model.depth, every)
        ]
        saved[policy] = kept.total + max(live_again, default=0)
    return MeasuredActivations(saved=saved, whole=whole)
