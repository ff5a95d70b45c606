"""The GPU tier: runs where CUDA is present, skipped elsewhere."""

from __future__ import annotations

import pytest
import torch

from sora_train.config import ModelConfig
from sora_train.models.denoiser import build_denoiser, build_tokenizer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_bf16_forward_backward_matches_fp32():
    cfg = ModelConfig(preset="test", hidden_size=128, depth=2, num_heads=4, patch_size=[1, 2, 2], text_dim=64,
                      text_depth=1, text_heads=2, text_vocab_size=512)  # fmt: skip
    torch.manual_seed(0)
    model = build_denoiser(cfg).cuda()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ids, mask = (t.cuda() for t in build_tokenizer(cfg)(["a red square moving left"] * 2))
    x, t = torch.randn(2, 3, 4, 32, 32, device="cuda"), torch.rand(2, device="cuda")
    reference = model(x, t, ids, mask)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x, t, ids, mask)
    out.float().square().mean().backward()
    torch.testing.assert_close(out.float(), reference, rtol=5e-2, atol=5e-2)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# Attention backends

# the largest difference from the fp32 math reference, as a share of the reference's largest magnitude
GPU_KERNEL_TOLERANCE = {torch.bfloat16: 0.04, torch.float16: 0.01}


def attention_inputs(dtype: torch.dtype, masked: bool) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """q, k, v (B, N, L, K) = (2, 4, 250, 64) on the GPU, and a key mask (B, L) keeping 250 and 170
    keys (None unmasked)."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    qkv = [torch.randn(2, 4, 250, 64, device="cuda", generator=generator, dtype=dtype) for _ in range(3)]
    mask = torch.arange(250, device="cuda")[None] < torch.tensor([[250], [170]], device="cuda")
    return qkv, mask if masked else None


def attention_and_gradients(
    qkv: list[torch.Tensor], mask: torch.Tensor | None, backends: list[str], weights: torch.Tensor
) -> list[torch.Tensor]:
    """The attention output and the gradients of (output · weights) with respect to q, k, v."""
    from sora_train.models.attention import attention

    leaves = [x.detach().clone().requires_grad_() for x in qkv]
    out = attention(*leaves, mask, backends)
    (out.float() * weights).sum().backward()
    return [out.detach(), *(x.grad for x in leaves)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_every_eligible_attention_kernel_matches_an_fp32_math_reference(masked, dtype):
    from sora_train.models.attention import NAMED_BACKENDS
    from sora_train.parallel.attention_backend import auto_backends

    qkv, mask = attention_inputs(dtype, masked)
    generator = torch.Generator(device="cuda").manual_seed(1)
    weights = torch.randn(2, 4, 250, 64, device="cuda", generator=generator)
    reference = attention_and_gradients([x.float() for x in qkv], mask, ["math"], weights)
    ran = []
    for name in NAMED_BACKENDS:
        try:
            results = attention_and_gradients(qkv, mask, [name], weights)
        except RuntimeError as error:  # this kernel cannot run this call: the option is named
            assert "train.attention_backend allows only" in str(error), error
            continue
        ran.append(name)
        for result, expected in zip(results, reference, strict=True):
            gap = (result.float() - expected).abs().max()
            assert gap <= GPU_KERNEL_TOLERANCE[dtype] * expected.abs().max(), (name, gap)
    expected_kernels = {"efficient", "math"}
    if not masked and torch.cuda.get_device_capability() >= (8, 0):
        expected_kernels.add("flash")
    if not masked and auto_backends(torch.device("cuda"))[0] == "cudnn":
        expected_kernels.add("cudnn")
    assert expected_kernels <= set(ran), ran
    assert not (masked and "flash" in ran)  # flash never takes a mask


def test_auto_attention_kernel_runs_in_the_forward_and_in_the_recompute():
    """With `auto`, the checkpointed blocks' attention runs the first fused kernel of the device's
    list (cuDNN on sm90+ with cuDNN 9, else flash) in the forward and again in the recompute."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from sora_train.models.attention import drop_caption_padding
    from sora_train.parallel.attention_backend import apply_attention_backend, auto_backends
    from sora_train.parallel.checkpointing import apply_activation_checkpointing

    aten = torch.ops.aten
    fused = {
        "cudnn": aten._scaled_dot_product_cudnn_attention.default,
        "flash": aten._scaled_dot_product_flash_attention.default,
    }

    class RecordOps(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: set = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(func)
            return func(*args, **(kwargs or {}))

    cfg = ModelConfig(preset="test", hidden_size=128, depth=2, num_heads=2, patch_size=[1, 2, 2], text_dim=64,
                      text_depth=1, text_heads=2, text_vocab_size=512)  # fmt: skip
    torch.manual_seed(0)
    model = build_denoiser(cfg).cuda()
    apply_attention_backend(model, "auto", torch.device("cuda"))
    apply_activation_checkpointing(model, "full")
    ids, mask = build_tokenizer(cfg)(["a red square moving left"] * 2)
    ids, mask, unpadded = drop_caption_padding(ids.cuda(), mask.cuda())  # one length: no mask needed
    text = model.text_encoder(ids, mask).detach()  # (B, 6, E), outside the recording
    x, t = torch.randn(2, 3, 4, 32, 32, device="cuda"), torch.rand(2, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16), RecordOps() as forward:
        out = model.dit(x, t, text, None)  # 1024 video tokens, K = 64
    with RecordOps() as backward:
        out.float().square().mean().backward()
    assert unpadded
    first = fused[next(b for b in auto_backends(torch.device("cuda")) if b in fused)]
    assert first in forward.ops and first in backward.ops, (forward.ops & set(fused.values()), first)
    assert aten._scaled_dot_product_efficient_attention.default not in forward.ops | backward.ops


# Inductor compile

COMPILE_VARIANTS = {
    "cross_attention": {},
    "mmdit": {"variant": "mmdit", "single_stream_blocks": 1},
    "wan": {"variant": "wan", "ffn_dim": 256},
}
BF16_LOSS_TOLERANCE = 0.01  # relative: inductor rounds fused pointwise chains to bf16 once, eager op by op


def block_compile_losses(
    cfg: ModelConfig, device: str, dtype: torch.dtype, policy: str, backend: str | None, steps: int = 3
) -> torch.Tensor:
    """The losses of `steps` AdamW steps of a seeded `dtype` model on `device` (moved off adaLN-Zero's
    zero start), its blocks checkpointed under `policy` and compiled with `backend` (None: eager)."""
    from sora_train.diffusion.flow import flow_loss
    from sora_train.parallel.checkpointing import apply_activation_checkpointing
    from sora_train.parallel.compile import apply_block_compile

    from .test_activation_policies import perturbed_denoiser

    model = perturbed_denoiser(cfg).to(device, dtype)
    apply_activation_checkpointing(model, policy)
    if backend is not None:
        apply_block_compile(model, backend=backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids, mask = (x.to(device) for x in build_tokenizer(cfg)(["a red square moving left", "a blue circle"]))
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x0, noise = torch.randn(2, 2, 3, 4, 32, 32, generator=generator).to(device, dtype)
        t = torch.rand(2, generator=generator).to(device, dtype)
        loss = flow_loss(lambda x_t, t_: model(x_t, t_, ids, mask), x0, noise, t)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach().float())
    return torch.stack(losses)


@pytest.mark.parametrize("policy", ["none", "selective"])
@pytest.mark.parametrize("variant", COMPILE_VARIANTS)
def test_inductor_blocks_train_in_bf16_as_eager_blocks(variant, policy):
    """Blocks compiled by inductor into Triton kernels train a bf16 model as eager blocks do."""
    cfg = ModelConfig(preset="test", hidden_size=128, depth=2, num_heads=2, patch_size=[1, 2, 2], text_dim=64,
                      text_depth=1, text_heads=2, text_vocab_size=512, **COMPILE_VARIANTS[variant])  # fmt: skip
    torch._dynamo.reset()
    eager = block_compile_losses(cfg, "cuda", torch.bfloat16, policy, backend=None)
    compiled = block_compile_losses(cfg, "cuda", torch.bfloat16, policy, backend="inductor")
    torch._dynamo.reset()
    print(f"{variant}, {policy}: eager {eager.tolist()}, compiled {compiled.tolist()}")
    assert torch.isfinite(compiled).all()
    torch.testing.assert_close(compiled, eager, rtol=BF16_LOSS_TOLERANCE, atol=0)
