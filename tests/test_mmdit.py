"""MM-DiT: its structure, its text masking, its FLOP count, and the frame-conditioning channel."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from sora_train.flops import JOINT, SAMPLE, TEXT, VIDEO, classify_parameters, parameter_role, sample_flops
from sora_train.models.denoiser import build_denoiser, build_tokenizer
from sora_train.models.mmdit import DoubleStreamBlock, SingleStreamBlock
from sora_train.throughput import attended_text_tokens

from .test_model import composed_preset, tiny_config


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with every weight moved off its (partly zero) initialisation, so every path matters."""
    torch.manual_seed(1)
    for p in model.parameters():
        p.data += 0.05 * torch.randn(p.shape)
    return model


@pytest.mark.parametrize("single", [0, 1])
def test_only_a_text_output_that_is_read_is_computed(single):
    model = build_denoiser(tiny_config(variant="mmdit", depth=3, single_stream_blocks=single)).dit
    kinds = [type(block) for block in model.blocks]
    assert kinds == [DoubleStreamBlock] * (3 - single) + [SingleStreamBlock] * single
    last_double = model.blocks[2 - single]
    # with nothing after it, the last double-stream block's text stream gives keys and values only
    assert last_double.text_stream.keys_only == (single == 0)
    assert (
        not hasattr(last_double.text_stream, "mlp")
        if single == 0
        else hasattr(last_double.text_stream, "mlp")
    )
    assert not any(block.text_stream.keys_only for block in model.blocks[: 2 - single])


def test_mmdit_parameters_have_flop_roles_by_stream():
    model = build_denoiser(tiny_config(variant="mmdit", depth=3, single_stream_blocks=1))
    roles = classify_parameters(model)  # raises for a parameter without a role
    assert roles["dit.blocks.0.video_stream.qkv.weight"] == VIDEO
    assert roles["dit.blocks.0.video_stream.mlp.2.weight"] == VIDEO
    assert roles["dit.blocks.0.text_stream.qkv.weight"] == TEXT
    assert roles["dit.blocks.0.text_stream.mlp.0.bias"] == TEXT
    assert roles["dit.blocks.0.text_stream.modulation.1.weight"] == SAMPLE
    assert roles["dit.blocks.2.qkv_mlp.weight"] == JOINT
    assert roles["dit.blocks.2.q_norm.weight"] == JOINT
    assert roles["dit.blocks.2.out.weight"] == JOINT
    assert roles["dit.blocks.2.modulation.1.bias"] == SAMPLE
    assert parameter_role("dit.blocks.0.self_attn.q_norm.weight") == VIDEO  # the cross-attention DiT's


@pytest.mark.parametrize(
    ("name", "single", "clip"),
    [("tiny", 0, (8, 16, 16)), ("tiny", 2, (8, 16, 16)), ("S", 0, (1, 16, 16)), ("S", 4, (2, 16, 16))],
)
def test_mmdit_flops_match_torch_flop_counter(name, single, clip):
    model = composed_preset(name)
    model.variant, model.single_stream_blocks = "mmdit", single
    torch.manual_seed(0)
    denoiser = build_denoiser(model)
    text, mask = build_tokenizer(model)(["a red square moving left"])
    x, t = torch.randn(1, 3, *clip), torch.rand(1)
    # The math backend runs attention as matmuls, which FlopCounterMode counts (CPU flash attention it does not).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        denoiser(x, t, text, mask).square().mean().backward()
    measured = counter.get_total_flops()
    (pt, ph, pw), (f, h, w) = model.patch_size, clip
    video_tokens = (f // pt) * (h // ph) * (w // pw)
    predicted = sample_flops(model, video_tokens, attended_text_tokens(mask, model.variant))  # padding cut
    assert abs(predicted / measured - 1) < 0.02, (predicted, measured)


@pytest.mark.parametrize("variant", ["cross_attention", "mmdit"])
def test_padded_caption_tokens_do_not_reach_the_video(variant):
    cfg = tiny_config(variant=variant)
    model = perturbed(build_denoiser(cfg)).eval()
    ids, mask = build_tokenizer(cfg)(["a red square"])
    x, t = torch.randn(1, 3, 4, 16, 16), torch.rand(1)
    changed = ids.clone()
    changed[~mask] = 7  # other token ids behind the mask
    changed_caption = ids.clone()
    changed_caption[0, 1] = 7  # a token the mask keeps
    with torch.no_grad():
        out = model(x, t, ids, mask)
        torch.testing.assert_close(model(x, t, changed, mask), out, rtol=0, atol=1e-6)
        assert not torch.allclose(model(x, t, changed_caption, mask), out, atol=1e-4)


@pytest.mark.parametrize("variant", ["cross_attention", "mmdit"])
def test_frame_mask_is_an_input_channel_only_with_frame_conditioning(variant):
    cfg = tiny_config(variant=variant, frame_conditioning=True)
    model = perturbed(build_denoiser(cfg)).eval()
    plain = build_denoiser(tiny_config(variant=variant))
    assert model.dit.patch_embed.in_features == plain.dit.patch_embed.in_features * 4 // 3  # 3 + 1 channels
    ids, mask = build_tokenizer(cfg)(["a red square"])
    x, t = torch.randn(1, 3, 4, 16, 16), torch.rand(1)
    none = torch.zeros(1, 4, dtype=torch.bool)
    first = torch.tensor([[True, False, False, False]])
    with torch.no_grad():
        assert torch.equal(model(x, t, ids, mask), model(x, t, ids, mask, none))  # no mask: nothing clean
        assert not torch.allclose(model(x, t, ids, mask, first), model(x, t, ids, mask, none), atol=1e-4)
        with pytest.raises(ValueError, match="frame_conditioning"):
            plain(x, t, ids, mask, first)
