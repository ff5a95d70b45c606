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
