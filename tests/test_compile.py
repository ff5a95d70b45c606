"""Transformer blocks compiled with inductor train as eager blocks do (CPU, float32).

Each variant trains a few optimizer steps from the same weights on the same batches, its blocks
eager and then compiled by `parallel/compile.apply_block_compile` (after activation checkpointing,
as the trainer applies them): the losses agree to 1e-5, and the generated kernels fuse adaLN's
modulation and gates with their norms and take the RoPE table whole (no cos/sin computed inside).
The trainer with `train.compile_blocks=true` logs the losses it logs without.

Inductor writes C++ kernels and compiles them, which takes seconds per graph on two cores, so the
models are tiny and every block of a model is of one kind (one graph each); compiled artifacts
land in inductor's cache (TORCHINDUCTOR_CACHE_DIR, by default under the system's temp dir), which
makes reruns several times faster.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code

from sora_train.config import ModelConfig
from sora_train.diffusion.flow import flow_loss
from sora_train.metrics import read_metrics
from sora_train.models.denoiser import build_tokenizer
from sora_train.parallel.checkpointing import apply_activation_checkpointing
from sora_train.parallel.compile import apply_block_compile

from .conftest import FAST, assert_ok, run_module
from .test_activation_policies import perturbed_denoiser

LOSS_TOLERANCE = 1e-5  # relative, on losses around 1
STEPS = 3

VARIANTS = {
    "cross_attention": {},
    "mmdit": {"variant": "mmdit", "depth": 1},  # one double-stream block (its text gives keys only)
    "wan": {"variant": "wan", "ffn_dim": 48},
}


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(preset="test", hidden_size=32, depth=2, num_heads=2, patch_size=[1, 2, 2], text_dim=32,
                  text_depth=1, text_heads=2, text_vocab_size=256)  # fmt: skip
    return ModelConfig(**{**fields, **overrides})


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compiled code attaches to the blocks' shared `forward`: start and leave with none."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`STEPS` batches of one shape: latents, noise, timesteps (the captions stay the same: a new
    caption length would be a new shape for the compiled blocks)."""
    generator = torch.Generator().manual_seed(1)
    found = []
    for _ in range(STEPS):
        x0, noise = torch.randn(2, 2, 3, 2, 8, 8, generator=generator)
        found.append((x0, noise, torch.rand(2, generator=generator)))
    return found


def fused_ops(code: str) -> list[str]:
    """The names of the C++ kernels in inductor's output code, in order: each names the ops it fuses
    (e.g. `cpp_fused_add_addcmul_native_layer_norm_1`)."""
    return re.findall(r"(cpp_fused_\w+) = async_compile", code)


def train_losses(cfg: ModelConfig, policy: str, backend: str | None) -> torch.Tensor:
    """The loss of each AdamW step from a seeded init moved off adaLN-Zero's zero start (so that
    every block gets gradients), blocks compiled with `backend` (None: eager)."""
    model = perturbed_denoiser(cfg)
    apply_activation_checkpointing(model, policy)
    if backend is not None:
        apply_block_compile(model, backend=backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    ids, mask = build_tokenizer(cfg)(["a red square moving left", "a blue circle"])
    for x0, noise, t in batches():
        loss = flow_loss(lambda x_t, t_: model(x_t, t_, ids, mask), x0, noise, t)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("variant", "policy"),
    [
        ("cross_attention", "none"),
        ("cross_attention", "selective"),
        ("mmdit", "selective"),
        ("wan", "selective"),
    ],
)
def test_inductor_blocks_train_as_eager_blocks(variant, policy):
    cfg = tiny_config(**VARIANTS[variant])
    eager = train_losses(cfg, policy, backend=None)
    compiled, codes = run_and_get_code(train_losses, cfg, policy, "inductor")
    # one graph for all steps and blocks, without graph breaks: a forward and a backward module
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters)
    assert len(codes) == 2
    print(f"{variant}, {policy}: eager {eager.tolist()}, compiled {compiled.tolist()}")
    torch.testing.assert_close(compiled, eager, rtol=LOSS_TOLERANCE, atol=0)
    kernels = [fused_ops(code) for code in codes]  # each graph's kernels, in order
    # adaLN's modulate and gates (addcmul) share a kernel with a norm, but the block's last gate
    assert all("layer_norm" in ops for graph in kernels for ops in graph[:-1] if "addcmul" in ops), kernels
    assert any("addcmul" in ops and "layer_norm" in ops for ops in kernels[0]), kernels[0]
    # the RoPE table comes in whole: no cos or sin in the compiled blocks
    assert not any(re.search(r"_(cos|sin)_", ops) for graph in kernels for ops in graph), kernels


@pytest.mark.slow
def test_trainer_with_compiled_blocks_logs_the_same_losses(tmp_path: Path, corpus: Path):
    steps = (
        "train.max_steps=3",
        "train.global_batch_size=2",
        "checkpoint.every=0",
        "checkpoint.save_final=false",
    )
    quiet = ("eval.validate=false", "train.sample_prompts=[]", "data.num_workers=0")
    # every caption kept and filling 4 tokens: one text shape and no mask, so one graph (a batch with
    # a shorter or dropped caption needs a masked graph, compiled once more; the test above has one)
    text = ("model.text_max_length=4", "data.caption_dropout=0")
    losses = {}
    for compiled in (False, True):
        run_dir = tmp_path / f"compiled_{compiled}"
        result = run_module(
            "sora_train.cli", *FAST, f"data.train={corpus / 'train'}", *steps, *quiet, *text,
            f"train.compile_blocks={str(compiled).lower()}", f"run_dir={run_dir}",
            timeout=600, env={"TORCH_LOGS": "recompiles,graph_breaks"},
        )  # fmt: skip
        assert_ok(result)
        assert "Recompiling" not in result.stderr and "Graph break" not in result.stderr, result.stderr[
            -4000:
        ]
        losses[compiled] = torch.tensor([row["loss"] for row in read_metrics(run_dir) if "loss" in row])
    print(f"trainer losses: eager {losses[False].tolist()}, compiled {losses[True].tolist()}")
    assert len(losses[False]) == 3
    torch.testing.assert_close(losses[True], losses[False], rtol=LOSS_TOLERANCE, atol=0)
