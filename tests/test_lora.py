"""LoRA on peft: targets by pattern, a frozen base that never changes, merging equal to peft's own,
and adapters written in diffusers' format that a diffusers Wan transformer loads to the same output."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sora_train.config import ModelConfig
from sora_train.models.denoiser import build_denoiser
from sora_train.models.lora import (
    DEFAULT_TARGETS,
    LoraSpec,
    LoraTargetError,
    adapter_state,
    apply_lora,
    diffusers_lora_state,
    is_adapter,
    matching_modules,
    merged_weights,
)

pytest.importorskip("peft")


def tiny_denoiser(variant: str = "cross_attention") -> nn.Module:
    """A tiny denoiser with every weight non-zero, as pretrained weights are (a fresh DiT's zero-init
    output layer and gates would pass no gradient to the adapters)."""
    torch.manual_seed(0)
    model = build_denoiser(
        ModelConfig(preset="test", hidden_size=32, depth=2, num_heads=2, variant=variant, text_dim=32,
                    text_heads=2, text_depth=1, text_vocab_size=64, patch_size=[1, 2, 2])
    )  # fmt: skip
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def inputs(batch: int = 2) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 2, 8, 8, generator=generator)
    t = torch.rand(batch, generator=generator)
    ids = torch.randint(1, 64, (batch, 16), generator=generator)
    return x, t, ids, torch.ones(batch, 16, dtype=torch.bool)


def randomise_adapters(model: nn.Module) -> None:
    """lora_B starts at zero (the adapted model equals the base); give it values for the tests."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize("variant", ["cross_attention", "mmdit"])
def test_default_targets_adapt_attention_and_mlp_only_and_start_as_the_base(variant):
    model = tiny_denoiser(variant)
    before = model(*inputs())
    targets = apply_lora(model, LoraSpec(rank=4, alpha=8, dropout=0.0, targets=DEFAULT_TARGETS[variant]))
    assert targets and not any("modulation" in name or "embed" in name for name in targets)
    torch.testing.assert_close(model(*inputs()), before, rtol=0, atol=1e-5)  # B = 0: the same function
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(is_adapter(name) for name in trainable)


def test_training_moves_the_adapters_and_never_the_base():
    model = tiny_denoiser()
    apply_lora(model, LoraSpec(rank=4, alpha=4, dropout=0.1, targets=DEFAULT_TARGETS["cross_attention"]))
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not is_adapter(n)}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(*inputs()).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if not is_adapter(n))
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_B." in n)


def test_targets_that_match_nothing_are_refused_with_examples():
    with pytest.raises(LoraTargetError, match=r"match no Linear module; names look like \['dit\."):
        apply_lora(
            tiny_denoiser(), LoraSpec(rank=2, alpha=2, dropout=0.0, targets=(r"dit\.blocks\.\d+\.nothing",))
        )


def test_patterns_match_whole_names_only():
    model = tiny_denoiser()
    assert matching_modules(model, [r"dit\.blocks\.0\.mlp\.0"]) == ["dit.blocks.0.mlp.0"]
    assert matching_modules(model, [r"mlp\.0"]) == []  # a full match, not a search


def test_merged_weights_equal_peft_merge():
    model = tiny_denoiser()
    base = {n: p.detach().clone() for n, p in model.state_dict().items()}
    spec = LoraSpec(rank=4, alpha=6, dropout=0.0, targets=DEFAULT_TARGETS["cross_attention"])
    apply_lora(model, spec)
    randomise_adapters(model)
    adapted_output = model(*inputs())
    ours = merged_weights(base.items(), adapter_state(model), spec.scale)
    plain = tiny_denoiser()
    plain.load_state_dict(ours)
    torch.testing.assert_close(plain(*inputs()), adapted_output, rtol=0, atol=1e-5)
    for module in model.modules():  # peft's own merge, for the weights themselves
        if hasattr(module, "merge") and hasattr(module, "lora_A"):
            module.merge()
    peft_merged = {
        n.replace(".base_layer", ""): p for n, p in model.state_dict().items() if not is_adapter(n)
    }
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, peft_merged[name], rtol=0, atol=1e-6)


class Holder(nn.Module):
    """A diffusers transformer where our denoiser keeps its DiT (`dit.`), so names match ours."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.dit = transformer


def test_adapters_in_diffusers_format_load_into_a_diffusers_wan_transformer():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    reference = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
    ).eval()  # fmt: skip
    ours = Holder(copy.deepcopy(reference))
    spec = LoraSpec(rank=4, alpha=2, dropout=0.0, targets=DEFAULT_TARGETS["wan"])
    apply_lora(ours, spec)
    randomise_adapters(ours)
    generator = torch.Generator().manual_seed(3)
    x, text = torch.randn(1, 4, 2, 8, 8, generator=generator), torch.randn(1, 5, 16, generator=generator)
    t = torch.tensor([500.0])
    with torch.no_grad():
        expected = ours.dit(x, t, text, return_dict=False)[0]
        reference.load_lora_adapter(
            diffusers_lora_state(adapter_state(ours), spec.scale), prefix="transformer"
        )
        got = reference(x, t, text, return_dict=False)[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
