"""Attention without masks where none is needed, and the SDPA kernel every attention call runs.

- Captions lose the padding none of them needs, and their mask when all keep every remaining
  token: the denoiser (cross-attention DiT, MM-DiT) then equals the masked computation over the
  padded captions, outputs and gradients, float32 tightly and bfloat16 loosely; joint attention on
  its own likewise. Wan keeps its captions whole (it attends to their zeroed padding).
- Ulysses over a padded sequence slices its padded keys off instead of masking them (2 processes).
- `train.attention_backend` resolves per device, and the chosen kernel runs in the forward, in the
  recompute of checkpointed blocks during backward, and inside compiled blocks.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import get_args

import pytest
import torch
import torch.nn.functional as F
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from sora_train.config import ModelConfig
from sora_train.models.attention import (
    NAMED_BACKENDS,
    AttentionBackend,
    attention,
    drop_caption_padding,
    joint_attention,
)
from sora_train.models.denoiser import VideoDenoiser, build_denoiser, build_tokenizer
from sora_train.parallel.attention_backend import apply_attention_backend, resolve_attention_backend
from sora_train.parallel.checkpointing import apply_activation_checkpointing
from sora_train.parallel.compile import apply_block_compile

from .conftest import assert_ok, run_torchrun

SCRIPTS = Path(__file__).parent / "scripts"
CPU = torch.device("cpu")
aten = torch.ops.aten
FLASH_OP, FLASH_BACKWARD_OP = (
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
)
VARIANTS = {
    "cross_attention": {},
    "mmdit": {"variant": "mmdit"},
    "mmdit_single": {"variant": "mmdit", "single_stream_blocks": 1},
    "wan": {"variant": "wan", "ffn_dim": 48},
}
ATTENTION_CALLS_PER_BLOCK = {"cross_attention": 2, "mmdit": 1, "mmdit_single": 1, "wan": 2}
CAPTIONS = {  # 16 caption tokens, the first one BOS
    "same length": ["a red square moving left", "a blue circle moving up"],  # 6 and 6 tokens
    "different lengths": ["a red square moving left", "a blue circle"],  # 6 and 4 tokens
    "unpadded": [" ".join(["word"] * 20)] * 2,  # cut to 16
}
FRAMES, SIZE, VIDEO_TOKENS = 4, 16, 32  # a (4, 16, 16) clip is 2 × 4 × 4 tokens at patch 2×4×4
FP32 = {"rtol": 1e-5, "atol": 1e-6}
BF16 = 0.03  # of the reference's largest magnitude: bf16 rounding in different summation orders


def small_config(variant: str) -> ModelConfig:
    patch = [1, 2, 2] if variant == "wan" else [2, 4, 4]
    return ModelConfig(preset="test", hidden_size=32, depth=2, num_heads=2, patch_size=patch, text_dim=32,
                       text_depth=1, text_heads=2, text_vocab_size=256, **VARIANTS[variant])  # fmt: skip


def perturbed_denoiser(variant: str) -> VideoDenoiser:
    """A seeded denoiser moved off adaLN-Zero's zero start, so every block contributes."""
    torch.manual_seed(0)
    model = build_denoiser(small_config(variant))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def clip_inputs(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, FRAMES, SIZE, SIZE, generator=generator).to(dtype)
    return x, torch.rand(2, generator=generator)


class RecordSDPA(TorchFunctionMode):
    """(key count, masked) of every SDPA call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, bool]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.calls.append((args[1].shape[2], kwargs.get("attn_mask") is not None))
        return func(*args, **kwargs)


class RecordOps(TorchDispatchMode):
    """How many times each aten op ran."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] = self.counts.get(func, 0) + 1
        return func(*args, **(kwargs or {}))


def test_caption_padding_is_cut_after_the_last_kept_token_and_the_mask_dropped_when_all_keep_all():
    def cut(rows: list[list[int]]) -> tuple[list[list[int]], bool]:
        mask = torch.tensor(rows, dtype=torch.bool)
        text = torch.randn(*mask.shape, 3)  # (B, T, E)
        kept_text, kept_mask, unpadded = drop_caption_padding(text, mask)
        assert torch.equal(kept_text, text[:, : kept_mask.shape[1]])
        return kept_mask.int().tolist(), unpadded

    assert cut([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]) == ([[1, 1, 1], [1, 1, 1]], True)
    assert cut([[1, 1, 0, 0], [1, 1, 1, 0]]) == ([[1, 1, 0], [1, 1, 1]], False)
    assert cut([[1, 1, 1], [1, 1, 1]]) == ([[1, 1, 1], [1, 1, 1]], True)
    assert cut([[0, 1, 1, 0], [0, 1, 1, 0]]) == ([[0, 1, 1], [0, 1, 1]], False)  # padding in front too


def joint_inputs(dtype: torch.dtype, text_queries: bool) -> tuple[list, list]:
    """Video (B, N, S, K) and text (B, N, T, K) queries, keys and values, needing gradients."""
    generator = torch.Generator().manual_seed(0)

    def tensor(tokens: int) -> torch.Tensor:
        return torch.randn(2, 2, tokens, 8, generator=generator).to(dtype).requires_grad_()

    video = [tensor(12) for _ in range(3)]
    text = [tensor(16) for _ in range(3)]
    if not text_queries:
        text[0] = None
    return video, text


@pytest.mark.parametrize("text_queries", [True, False], ids=["text output", "keys only"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lengths", [(6, 6), (6, 4), (16, 16)], ids=["same", "different", "unpadded"])
def test_joint_attention_without_caption_padding_equals_the_masked_reference(lengths, dtype, text_queries):
    video, text = joint_inputs(dtype, text_queries)
    mask = torch.arange(16)[None] < torch.tensor(lengths)[:, None]  # (B, T) right-padded captions
    _, kept_mask, unpadded = drop_caption_padding(mask, mask)
    kept = kept_mask.shape[1]
    assert (kept, unpadded) == (max(lengths), len(set(lengths)) == 1)
    cut_text = [None if x is None else x[:, :, :kept] for x in text]
    out_video, out_text = joint_attention(video, cut_text, None if unpadded else kept_mask)
    upcast = [
        [None if x is None else x.detach().float().requires_grad_() for x in part] for part in (video, text)
    ]
    reference_video, reference_text = joint_attention(*upcast, mask)  # masked over all 16
    weights = torch.randn(2, 2, 12 + kept, 8, generator=torch.Generator().manual_seed(1))
    weights[:, :, 12:] *= kept_mask[:, None, :, None]  # padded text queries: no output to compare
    ours, reference = [out_video], [reference_video]
    if text_queries:
        ours.append(out_text)
        reference.append(reference_text[:, :, :kept])
    ours, reference = torch.cat(ours, dim=2), torch.cat(reference, dim=2)
    (ours.float() * weights[:, :, : ours.shape[2]]).sum().backward()
    (reference * weights[:, :, : ours.shape[2]]).sum().backward()
    compared = weights[:, :, : ours.shape[2]] != 0
    pairs = [(ours * compared, reference * compared)]
    pairs += [(mine.grad, theirs.grad) for mine, theirs in zip(video, upcast[0], strict=True)]
    for mine, theirs in zip(text, upcast[1], strict=True):
        if mine is not None:
            pairs.append((mine.grad[:, :, :kept], theirs.grad[:, :, :kept]))
            assert not theirs.grad[:, :, kept:].any()  # keys no caption keeps get no gradient either
    for mine, theirs in pairs:
        assert_close(mine, theirs, dtype)


def assert_close(ours: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> None:
    """float32: tight; bfloat16: within `BF16` of the reference's largest magnitude."""
    if dtype == torch.float32:
        torch.testing.assert_close(ours, reference, **FP32)
    else:
        gap = (ours.float() - reference.float()).abs().max()
        assert gap <= BF16 * reference.float().abs().max(), (gap, reference.abs().max())


def forward_backward(model: VideoDenoiser, *inputs: torch.Tensor, whole_captions: bool) -> tuple:
    """The output and parameter gradients: through the denoiser (captions cut), or (`whole_captions`)
    through the DiT with the text encoder's output over every caption position and the full mask."""
    model.zero_grad()
    x, t, ids, mask = inputs
    with RecordSDPA() as record:
        if whole_captions:
            out = model.dit(x, t, model.text_encoder(ids, mask), mask)
        else:
            out = model(x, t, ids, mask)
        out.float().square().mean().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()], record.calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("captions", CAPTIONS)
@pytest.mark.parametrize("variant", ["cross_attention", "mmdit", "mmdit_single"])
def test_denoiser_without_caption_padding_equals_the_masked_model(variant, captions, dtype):
    model = perturbed_denoiser(variant).to(dtype)
    ids, mask = build_tokenizer(small_config(variant))(CAPTIONS[captions])
    inputs = (*clip_inputs(dtype), ids, mask)
    out, grads, calls = forward_backward(model, *inputs, whole_captions=False)
    reference, reference_grads, reference_calls = forward_backward(model, *inputs, whole_captions=True)
    assert_close(out, reference, dtype)
    for grad, reference_grad in zip(grads, reference_grads, strict=True):
        assert_close(grad, reference_grad, dtype)
    text_keys = {"same length": 6, "different lengths": 6, "unpadded": 16}[captions]
    text_calls = [(keys - VIDEO_TOKENS if variant != "cross_attention" else keys, masked)
                  for keys, masked in calls if variant != "cross_attention" or keys != VIDEO_TOKENS]  # fmt: skip
    assert {keys for keys, _ in text_calls} == {text_keys}  # every caption token kept, no column more
    assert all(masked == (captions == "different lengths") for _, masked in text_calls)
    assert all(masked for keys, masked in reference_calls if keys != VIDEO_TOKENS)  # the reference masks


def test_wan_attends_to_the_whole_padded_caption():
    model = perturbed_denoiser("wan")
    ids, mask = build_tokenizer(small_config("wan"))(CAPTIONS["same length"])
    with RecordSDPA() as record:
        model(*clip_inputs(), ids, mask)
    assert {keys for keys, _ in record.calls} == {16, 4 * 8 * 8} and not any(m for _, m in record.calls)


@pytest.mark.distributed
def test_ulysses_drops_padded_keys_instead_of_masking(tmp_path):
    out = tmp_path / "report.json"
    assert_ok(run_torchrun(2, SCRIPTS / "attention_masks_check.py", str(out)))
    report = json.loads(out.read_text())
    for name, entry in {**report["layout"], **report["models"]}.items():
        tolerance = 1e-6 if "float32" in name else BF16
        gaps = {key: value for key, value in entry.items() if key != "masked_calls"}
        for key, value in gaps.items():
            assert value["gap"] <= tolerance * value["scale"], (name, key, value)
        assert entry["masked_calls"] == (1 if "ragged" in name else 0), name
    assert report["backends"] == {
        "backend_first": ["math"], "sequence_parallel_first": ["math"], "layouts": ["UlyssesLayout"] * 2,
    }  # fmt: skip


def test_backends_resolve_per_device(monkeypatch):
    assert set(get_args(AttentionBackend)) == {"auto", *NAMED_BACKENDS}
    assert resolve_attention_backend("auto", CPU) == ("flash", "math")
    assert resolve_attention_backend("flash", CPU) == ("flash",)
    assert resolve_attention_backend("math", CPU) == ("math",)
    for name in ("efficient", "cudnn"):
        with pytest.raises(ValueError, match=f"train.attention_backend={name} has no kernel on cpu"):
            resolve_attention_backend(name, CPU)
    with pytest.raises(ValueError, match="one of auto, cudnn, flash, efficient, math, got 'fastest'"):
        resolve_attention_backend("fastest", CPU)
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    for capability, cudnn_version, expected in [
        ((9, 0), 90100, ("cudnn", "flash", "efficient", "math")),  # H100 / H200 with cuDNN 9
        ((10, 0), 90700, ("cudnn", "flash", "efficient", "math")),
        ((9, 0), 8907, ("flash", "efficient", "math")),  # cuDNN 8: no fused attention
        ((8, 0), 90100, ("flash", "efficient", "math")),  # A100
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        monkeypatch.setattr(torch.backends.cudnn, "version", lambda v=cudnn_version: v)
        assert resolve_attention_backend("auto", gpu) == expected, capability
    assert resolve_attention_backend("efficient", gpu) == ("efficient",)
    assert resolve_attention_backend("cudnn", gpu) == ("cudnn",)
    model = perturbed_denoiser("cross_attention")
    apply_attention_backend(model, "auto", CPU)
    assert pickle.loads(pickle.dumps(model)).dit.layout.backends == ("flash", "math")  # names pickle


def test_a_kernel_that_cannot_run_a_call_fails_naming_the_option():
    q, v = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 8)  # CPU flash needs one head size for q, k, v
    with pytest.raises(RuntimeError, match=r"train\.attention_backend allows only"):
        attention(q, q, v, backends=["flash"])
    assert attention(q, q, v, backends=["flash", "math"]).shape == (1, 2, 4, 8)


def dit_inputs(variant: str) -> tuple[torch.Tensor, ...]:
    """A clip, timesteps, caption embeddings (B, T, E) and a full caption mask, for `model.dit`."""
    x, t = clip_inputs()
    text = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(2))
    return x, t, text, torch.ones(2, 6, dtype=torch.bool)


@pytest.mark.parametrize("backend", ["flash", "math"])
@pytest.mark.parametrize("policy", ["full", "selective"])
@pytest.mark.parametrize("variant", ["cross_attention", "mmdit", "wan"])
def test_checkpointed_blocks_recompute_attention_with_the_chosen_kernel(variant, policy, backend):
    """The forward and the backward each run inside the other kernel's `sdpa_kernel`, as a training
    loop's context would be: the layout's choice wins in both, the recompute included."""
    model = perturbed_denoiser(variant)
    apply_attention_backend(model, backend, CPU)
    apply_activation_checkpointing(model, policy)
    other = SDPBackend.MATH if backend == "flash" else SDPBackend.FLASH_ATTENTION
    with sdpa_kernel(other), RecordOps() as forward:
        loss = model.dit(*dit_inputs(variant)).square().mean()
    with sdpa_kernel(other), RecordOps() as backward:
        loss.backward()
    calls = ATTENTION_CALLS_PER_BLOCK[variant] * len(model.dit.blocks)
    if backend == "flash":
        assert forward.counts.get(FLASH_OP) == calls and backward.counts.get(FLASH_BACKWARD_OP) == calls
        # full: every call recomputed with flash; selective: flash's outputs kept, nothing recomputed
        assert backward.counts.get(FLASH_OP, 0) == (calls if policy == "full" else 0)
    else:
        assert FLASH_OP not in forward.counts and FLASH_OP not in backward.counts
        assert backward.counts.get(aten.bmm.default, 0) >= 2 * calls  # math: score and value matmuls


def recording_backend(ops: set[str]):
    """An AOTAutograd backend that runs the graphs as they are and notes every op they call (and
    the op a higher-order op such as `run_and_save_rng_state` wraps)."""

    def compiler(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        for node in graph.graph.nodes:
            if node.op != "call_function":
                continue
            ops.add(str(node.target))
            if node.args and isinstance(node.args[0], torch._ops.OpOverload):
                ops.add(str(node.args[0]))
        return make_boxed_func(graph.forward)

    return aot_autograd(fw_compiler=compiler, bw_compiler=compiler)


def test_compiled_blocks_trace_the_chosen_kernel_without_graph_breaks():
    """math, not torch's CPU default (flash): the compiled graphs show the choice was traced."""
    torch._dynamo.reset()
    counters.clear()
    model = perturbed_denoiser("cross_attention")
    apply_attention_backend(model, "math", CPU)
    apply_activation_checkpointing(model, "selective")
    ops: set[str] = set()
    apply_block_compile(model, backend=recording_backend(ops))
    model.dit(*dit_inputs("cross_attention")).square().mean().backward()
    # one graph for both blocks, self- and cross-attention with the kernel choice inside
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters)
    assert str(aten.bmm.default) in ops and not {str(FLASH_OP), str(FLASH_BACKWARD_OP)} & ops
