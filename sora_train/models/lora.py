"""LoRA adapters on a denoiser, built on peft: inject, freeze the base, read and write the adapters.

Shape legend: D_in, D_out a targeted Linear's widths, R the rank.

`apply_lora` adds a rank-R adapter (lora_A (R, D_in), lora_B (D_out, R), B zero-initialised, so
the adapted model starts equal to the base) to every Linear whose name matches one of the target
patterns, and leaves only the adapters trainable: the base weights get no gradient and never reach
the optimizer. The adapters' names are the base module's name plus `.lora_A.default.weight` /
`.lora_B.default.weight`, as peft writes them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

ADAPTER = "default"  # peft's adapter name: one adapter per model
ADAPTER_MARK = ".lora_"  # in the name of every adapter parameter


# Default targets per model variant: attention q/k/v/out and the FFN of every block (never the
# modulation, embeddings or output layer).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "wan": (
        r"dit\.blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",
        r"dit\.blocks\.\d+\.ffn\.net\.(0\.proj|2)",
    ),
    "cross_attention": (
        r"dit\.blocks\.\d+\.(self_attn\.(qkv|proj)|cross_attn\.(q|kv|proj))",
        r"dit\.blocks\.\d+\.mlp\.(0|2)",
    ),
    "mmdit": (
        r"dit\.blocks\.\d+\.(video|text)_stream\.(qkv|proj|mlp\.0|mlp\.2)",
        r"dit\.blocks\.\d+\.(qkv_mlp|out)",  # single-stream blocks
    ),
}


class LoraTargetError(ValueError):
    """LoRA target patterns that match no Linear module of the model."""


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA's settings: rank R, alpha (the update is scaled by alpha / R), dropout on the
    adapter's input, and the regular expressions (full match) naming the Linear modules to adapt."""

    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def lora_spec(
    variant: str, rank: int, alpha: float | None, dropout: float, targets: Sequence[str] | None
) -> LoraSpec:
    """The LoRA `model.lora` describes for a model `variant`: alpha None means alpha = rank, targets
    None the variant's `DEFAULT_TARGETS`."""
    chosen = tuple(targets) if targets else DEFAULT_TARGETS[variant]
    return LoraSpec(rank=rank, alpha=float(alpha or rank), dropout=dropout, targets=chosen)


def matching_modules(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names of `model`'s Linear modules that fully match one of `patterns` (in module order)."""
    compiled = [re.compile(pattern) for pattern in patterns]
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(p.fullmatch(name) for p in compiled)
    ]


def apply_lora(model: nn.Module, spec: LoraSpec) -> list[str]:
    """Add `spec`'s adapters to `model` in place and freeze everything else; returns the adapted
    module names. Raises LoraTargetError when no Linear module matches the targets."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = matching_modules(model, spec.targets)
    if not targets:
        raise LoraTargetError(
            f"model.lora.targets {list(spec.targets)} match no Linear module; names look like "
            f"{_example_names(model)}"
        )
    config = LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets, bias="none"
    )
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(is_adapter(name))
    return targets


def _example_names(model: nn.Module, count: int = 4) -> list[str]:
    """A few Linear module names of `model`, for an error message."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)][:count]


def is_adapter(name: str) -> bool:
    """Whether a parameter name belongs to a LoRA adapter."""
    return ADAPTER_MARK in name


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights by parameter name (what a LoRA checkpoint and export hold)."""
    return {name: p.detach() for name, p in model.named_parameters() if is_adapter(name)}


def base_name(adapter_name: str) -> str:
    """The adapted Linear's module name of an adapter parameter (`blocks.0.attn1.to_q.lora_A.default.weight`
    -> `blocks.0.attn1.to_q`)."""
    return adapter_name.split(ADAPTER_MARK, 1)[0]


def merged_weights(
    base: Iterable[tuple[str, torch.Tensor]], adapters: dict[str, torch.Tensor], scale: float
) -> dict[str, torch.Tensor]:
    """Base weights with every adapter folded in: W + scale · B @ A (fp32, then the base dtype).

    `base` yields (parameter name, tensor) of the base model (names without adapter parts, e.g.
    `dit.blocks.0.attn1.to_q.weight`); `adapters` is `adapter_state` of the adapted model.
    """
    pairs = _adapter_pairs(adapters)
    merged = {}
    for name, weight in base:
        module = name.removesuffix(".weight")
        if module in pairs and name.endswith(".weight"):
            down, up = pairs.pop(module)  # (R, D_in), (D_out, R)
            weight = (weight.float() + scale * (up.float() @ down.float())).to(weight.dtype)
        merged[name] = weight
    if pairs:
        raise ValueError(f"adapters without a base weight: {sorted(pairs)[:3]}")
    return merged


def _adapter_pairs(adapters: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{adapted module name: (lora_A weight, lora_B weight)}."""
    downs = {base_name(n): t for n, t in adapters.items() if ".lora_A." in n}
    ups = {base_name(n): t for n, t in adapters.items() if ".lora_B." in n}
    if downs.keys() != ups.keys():
        raise ValueError(f"unpaired LoRA weights: {sorted(downs.keys() ^ ups.keys())[:3]}")
    return {module: (downs[module], ups[module]) for module in downs}


def diffusers_lora_state(
    adapters: dict[str, torch.Tensor], scale: float, strip: str = "dit.", prefix: str = "transformer."
) -> dict[str, torch.Tensor]:
    """The adapters in diffusers' PEFT-format keys for `load_lora_weights`
    (`transformer.blocks.0.attn1.to_q.lora_A.weight`), with alpha / R folded into lora_B so the
    loader's default scale of 1 gives the trained update exactly."""
    state = {}
    for name, tensor in adapters.items():
        key = prefix + name.removeprefix(strip).replace(f".{ADAPTER}.", ".")
        state[key] = (tensor.float() * scale).to(tensor.dtype) if ".lora_B." in name else tensor
    return state
