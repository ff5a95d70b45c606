"""Activation checkpointing policies and per-block compilation, applied from sora_train.parallel.

Every policy must leave the gradients and the parameter names as they are and keep fewer bytes
for backward than no checkpointing (measured as the planner measures them); compiled blocks must
compute what eager blocks compute.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from sora_train.config import ModelConfig
from sora_train.models.denoiser import build_denoiser, build_tokenizer
from sora_train.parallel.checkpointing import POLICIES, apply_activation_checkpointing, checkpointed_blocks
from sora_train.parallel.compile import apply_block_compile
from sora_train.planning.measure import measure_saved_bytes

VARIANTS = {
    "cross_attention": {},
    "mmdit": {"variant": "mmdit"},  # the last double-stream block gives keys and values only
    "mmdit_single": {"variant": "mmdit", "single_stream_blocks": 2},
}


def small_config(**overrides) -> ModelConfig:
    fields = dict(preset="test", hidden_size=64, depth=4, num_heads=4, patch_size=[2, 4, 4], text_dim=32,
                  text_depth=1, text_heads=2, text_vocab_size=512)  # fmt: skip
    return ModelConfig(**{**fields, **overrides})


def perturbed_denoiser(cfg: ModelConfig) -> torch.nn.Module:
    """A seeded denoiser moved off adaLN-Zero's zero start, so every block contributes gradients."""
    torch.manual_seed(0)
    model = build_denoiser(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def test_checkpointed_blocks_by_policy():
    assert checkpointed_blocks("none", 6) == ()
    assert checkpointed_blocks("full", 6) == checkpointed_blocks("selective", 6) == (0, 1, 2, 3, 4, 5)
    assert checkpointed_blocks("every_k", 6, every=2) == (0, 2, 4)
    assert checkpointed_blocks("every_k", 7, every=3) == (0, 3, 6)
    assert checkpointed_blocks("every_k", 6, every=1) == checkpointed_blocks("full", 6)
    with pytest.raises(ValueError, match="none, full, every_k, selective"):
        checkpointed_blocks("true", 6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_policies_keep_gradients_and_names_and_save_less(variant):
    cfg = small_config(**VARIANTS[variant])
    ids, mask = build_tokenizer(cfg)(["a blue circle moving up", "a red square"])
    x, t = torch.randn(2, 3, 4, 16, 16), torch.rand(2)
    saved, grads = {}, {}
    for policy in POLICIES:
        model = perturbed_denoiser(cfg)
        names, keys = [n for n, _ in model.named_parameters()], list(model.state_dict())
        apply_activation_checkpointing(model, policy, every=2)
        assert [n for n, _ in model.named_parameters()] == names and list(model.state_dict()) == keys
        model(x, t, ids, mask).square().mean().backward()
        grads[policy] = [p.grad for p in model.parameters()]
        saved[policy] = measure_saved_bytes(model, x, ids, mask).total
    for policy in POLICIES[1:]:
        for plain, checkpointed in zip(grads["none"], grads[policy], strict=True):
            torch.testing.assert_close(checkpointed, plain, rtol=1e-6, atol=1e-10)
    assert saved["none"] > saved["every_k"] > saved["full"], saved
    assert saved["none"] > saved["selective"] > saved["full"], saved


def test_compiled_blocks_match_eager():
    # aot_eager, not inductor: it runs what compiling a checkpointed block changes (Dynamo tracing the
    # block with its selective checkpoint as one graph, AOTAutograd's joint graph and the partitioner
    # honouring the policy's recompute tags) in a few seconds. Inductor only adds kernel generation,
    # which takes ~30 s on 2 CPU cores even for this model (and matched eager to 1e-9 when checked).
    torch._dynamo.reset()
    counters.clear()
    cfg = small_config(variant="mmdit", single_stream_blocks=2)
    ids, mask = build_tokenizer(cfg)(["a blue circle moving up", "a red square"])
    x, t = torch.randn(2, 3, 4, 16, 16), torch.rand(2)
    results = []
    for compiled in (False, True):
        model = perturbed_denoiser(cfg)
        apply_activation_checkpointing(model, "selective")
        if compiled:
            apply_block_compile(model, backend="aot_eager")
        loss = model(x, t, ids, mask).square().mean()
        loss.backward()
        results.append((loss.detach(), list(model.state_dict()), [p.grad for p in model.parameters()]))
    (eager_loss, eager_keys, eager_grads), (loss, keys, grads) = results
    assert keys == eager_keys
    # one graph per kind of block (double- and single-stream), each with its checkpoint inside
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"], dict(counters)
    torch.testing.assert_close(loss, eager_loss)
    for compiled_grad, eager_grad in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(compiled_grad, eager_grad)
