"""`model.variant=wan` against diffusers' `WanTransformer3DModel`: the same parameter names and
shapes, the same outputs (fp32 within 1e-5) for text-to-video, image-to-video and Wan 2.2 TI2V's
per-token timesteps; bf16 close; sequence parallelism, activation checkpointing and compile applied
from `sora_train.parallel` as for the other variants."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from sora_train.config import ConfigError, ModelConfig
from sora_train.models.denoiser import FrozenTextEmbeddings, build_denoiser, build_tokenizer, wan_shape
from sora_train.models.dit import count_parameters
from sora_train.models.wan import WanShape, WanTransformer
from sora_train.parallel.checkpointing import POLICIES, apply_activation_checkpointing
from sora_train.parallel.compile import apply_block_compile
from sora_train.planning.cli import compose_config

from .conftest import assert_ok, run_torchrun

diffusers = pytest.importorskip("diffusers")

FP32_TOLERANCE = 1e-5
BF16_TOLERANCE = 0.02  # of the output's largest magnitude: bf16 itself (8-bit mantissa, measured ~0.9%)
BF16_SAME_OPS = 0.01  # of the output's largest magnitude: one bf16 ulp (2^-7 relative) and change
DIFFUSERS_TEXT_LENGTH = 512  # diffusers' image-to-video attention takes the last 512 context tokens as text

T2V = WanShape(hidden_size=48, depth=2, num_heads=2, ffn_dim=64, patch_size=(1, 2, 2), in_channels=4,
               out_channels=4, text_dim=16)  # fmt: skip
SHAPES = {
    "t2v 2 heads, patch 1x2x2, 3x6x10 (45 tokens)": (T2V, (3, 6, 10)),
    "t2v 3 heads of 12, patch 1x2x2, odd grid 3x5x7 (105 tokens)": (
        replace(T2V, hidden_size=36, num_heads=3, ffn_dim=40),
        (3, 10, 14),
    ),
    "t2v 4 heads of 8, patch 2x2x2, no cross-attention norm, eps 1e-5": (
        replace(T2V, hidden_size=32, num_heads=4, patch_size=(2, 2, 2), cross_attn_norm=False, norm_eps=1e-5),
        (4, 6, 6),
    ),
    "i2v (36-style extra input channels, image tokens)": (
        replace(T2V, in_channels=9, image_dim=20, added_kv_proj_dim=48),
        (2, 4, 6),
    ),
    "flf2v (i2v with the image position embedding)": (
        replace(T2V, in_channels=9, image_dim=20, added_kv_proj_dim=48, pos_embed_seq_len=6),
        (2, 4, 6),
    ),
}


def reference_and_ours(shape: WanShape) -> tuple[torch.nn.Module, WanTransformer]:
    """A random diffusers model and ours holding its weights (the table and pos_embed moved off their
    zero / default values so that every parameter matters)."""
    torch.manual_seed(0)
    reference = diffusers.WanTransformer3DModel(**shape.diffusers_config()).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.1 * torch.randn_like(param))
    ours = WanTransformer(shape)
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def inputs(shape: WanShape, size: tuple[int, int, int], batch: int = 4) -> dict:
    """Latents, four timesteps, captions of different lengths (padding != 0 in ours, zeroed for
    diffusers, as WanPipeline pads them) and, for image-to-video, image features."""
    generator = torch.Generator().manual_seed(1)
    text_length = DIFFUSERS_TEXT_LENGTH if shape.image_dim else 7
    lengths = torch.tensor([text_length, 3, 1, 5])[:batch]
    mask = torch.arange(text_length)[None] < lengths[:, None]  # (B, T)
    text = torch.randn(batch, text_length, shape.text_dim, generator=generator)
    found = {
        "x": torch.randn(batch, shape.in_channels, *size, generator=generator),
        "t": torch.tensor([0.0, 0.25, 0.7, 1.0])[:batch],
        "text": text,
        "text_mask": mask,
        "padded_text": text.masked_fill(~mask[..., None], 0),
        "image": None,
    }
    if shape.image_dim:
        tokens = shape.pos_embed_seq_len or 5
        found["image"] = torch.randn(batch, tokens, shape.image_dim, generator=generator)
    return found


def diffusers_image(shape: WanShape, image: torch.Tensor | None) -> torch.Tensor | None:
    """Diffusers' first-last-frame models take each frame's tokens as its own batch row."""
    if image is None or shape.pos_embed_seq_len is None:
        return image
    return image.reshape(image.shape[0] * 2, image.shape[1] // 2, image.shape[2])


def run_reference(reference, shape: WanShape, given: dict, timestep: torch.Tensor) -> torch.Tensor:
    return reference(
        given["x"], timestep, given["padded_text"], diffusers_image(shape, given["image"]), return_dict=False
    )[0]


def test_parameter_names_and_shapes_are_diffusers():
    for shape, _ in SHAPES.values():
        reference = diffusers.WanTransformer3DModel(**shape.diffusers_config())
        ours = WanTransformer(shape)
        assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
            (k, v.shape) for k, v in reference.state_dict().items()
        ]
        assert [n for n, _ in ours.named_buffers()] == []  # RoPE tables are computed, not kept
        assert WanShape.from_diffusers_config(dict(reference.config)) == shape


@pytest.mark.parametrize("name", SHAPES)
def test_forward_equals_diffusers_in_fp32(name):
    shape, size = SHAPES[name]
    reference, ours = reference_and_ours(shape)
    given = inputs(shape, size)
    with torch.no_grad():
        expected = run_reference(reference, shape, given, 1000 * given["t"])
        out = ours(given["x"], given["t"], given["text"], given["text_mask"], image=given["image"])
    assert out.shape == (4, shape.out_channels, *size)
    gap = (out - expected).abs().max().item()
    print(f"{name}: fp32 max |ours - diffusers| = {gap:.2e} (output scale {expected.abs().max():.2f})")
    assert gap <= FP32_TOLERANCE


def test_gradients_equal_diffusers_in_fp32():
    shape, size = SHAPES["t2v 2 heads, patch 1x2x2, 3x6x10 (45 tokens)"]
    reference, ours = reference_and_ours(shape)
    given = inputs(shape, size, batch=2)
    run_reference(reference, shape, given, 1000 * given["t"]).square().mean().backward()
    ours(given["x"], given["t"], given["text"], given["text_mask"]).square().mean().backward()
    expected = dict(reference.named_parameters())
    gap = max((p.grad - expected[n].grad).abs().max().item() for n, p in ours.named_parameters())
    print(f"fp32 max |grad ours - grad diffusers| = {gap:.2e}")
    assert gap <= FP32_TOLERANCE


@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 2, 2)])
def test_frame_conditioning_equals_diffusers_per_token_timesteps(patch):
    """Clean frames' tokens get timestep 0 (Wan 2.2 TI2V), diffusers' 2-D timestep path."""
    shape = replace(T2V, patch_size=patch, frame_conditioning=True)
    reference, ours = reference_and_ours(shape)
    given = inputs(shape, (4, 4, 6))
    frame_mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    pt, (f, h, w) = patch[0], (4 // patch[0], 2, 3)
    clean = frame_mask.reshape(4, f, pt).all(-1)  # (B, f): a token is clean when all its frames are
    timestep = (1000 * given["t"])[:, None] * (~clean).float().repeat_interleave(h * w, dim=1)  # (B, L)
    with torch.no_grad():
        expected = run_reference(reference, shape, given, timestep)
        out = ours(given["x"], given["t"], given["text"], given["text_mask"], frame_mask)
        whole = ours(given["x"], given["t"], given["text"], given["text_mask"])
    gap = (out - expected).abs().max().item()
    print(f"frame conditioning, patch {patch}: fp32 max |ours - diffusers 2-D timestep| = {gap:.2e}")
    assert gap <= FP32_TOLERANCE
    assert (whole[2] - out[2]).abs().max() <= FP32_TOLERANCE  # no clean frame: the (B,) path
    assert (whole[1] - out[1]).abs().max() > 1e-3  # clean first frames change the prediction
    with pytest.raises(ValueError, match="frame_conditioning"):
        WanTransformer(T2V)(given["x"], given["t"], given["text"], given["text_mask"], frame_mask)


@pytest.mark.parametrize("name", ["t2v 2 heads, patch 1x2x2, 3x6x10 (45 tokens)", "i2v (36-style extra input channels, image tokens)"])  # fmt: skip
def test_bf16_forward_stays_close(name):
    """Ours in bf16 against diffusers in fp32, and against diffusers in bf16 with its RoPE tables kept in
    float32 (as from_pretrained keeps them, and as ours computes them)."""
    shape, size = SHAPES[name]
    reference, ours = reference_and_ours(shape)
    given = inputs(shape, size)
    cast = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in given.items()}  # fmt: skip
    with torch.no_grad():
        expected = run_reference(reference, shape, given, 1000 * given["t"])
        out = ours.to(torch.bfloat16)(
            cast["x"], given["t"], cast["text"], cast["text_mask"], image=cast["image"]
        )
        tables = reference.rope.freqs_cos, reference.rope.freqs_sin
        reference = reference.to(torch.bfloat16)
        reference.rope.freqs_cos, reference.rope.freqs_sin = tables
        reference_bf16 = run_reference(reference, shape, cast, 1000 * given["t"])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    scale = expected.abs().max().item()
    gap = (out.float() - expected).abs().max().item()
    gap_bf16 = (out.float() - reference_bf16.float()).abs().max().item()
    print(f"{name}: bf16 max |ours - diffusers fp32| = {gap:.2e}, |ours - diffusers bf16| = {gap_bf16:.2e} "
          f"(output scale {scale:.2f})")  # fmt: skip
    assert gap <= BF16_TOLERANCE * scale  # the cost of bf16 itself
    assert gap_bf16 <= BF16_SAME_OPS * scale  # the same bf16 computation: at most an ulp apart


def wan_config(**overrides) -> ModelConfig:
    fields = dict(preset="test", variant="wan", hidden_size=32, depth=3, num_heads=2, ffn_dim=48,
                  patch_size=[1, 2, 2], text_dim=32, text_depth=1, text_heads=2, text_vocab_size=256)  # fmt: skip
    return ModelConfig(**{**fields, **overrides})


def test_denoiser_names_init_and_text_encoders():
    torch.manual_seed(0)
    learned = build_denoiser(wan_config())
    torch.manual_seed(0)
    again = build_denoiser(wan_config())
    for (name, a), (_, b) in zip(learned.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(a, b), name  # deterministic under torch.manual_seed
    names = [n for n, _ in learned.named_parameters()]
    assert all(n.startswith(("dit.", "text_encoder.")) for n in names)
    reference = diffusers.WanTransformer3DModel(**learned.dit.shape.diffusers_config())
    assert [n.removeprefix("dit.") for n in names if n.startswith("dit.")] == list(reference.state_dict())
    table = learned.dit.blocks[0].scale_shift_table
    assert table.abs().max() > 0 and learned.dit.proj_out.weight.abs().max() > 0  # not adaLN-Zero
    assert table.std().item() == pytest.approx(32**-0.5, rel=0.3)
    frozen = build_denoiser(wan_config(text_encoder="umt5", text_dim=4096))  # no files needed to build
    assert isinstance(frozen.text_encoder, FrozenTextEmbeddings)
    assert all(n.startswith("dit.") for n, _ in frozen.named_parameters())
    assert frozen.dit.condition_embedder.text_embedder.linear_1.in_features == 4096
    ids, mask = build_tokenizer(wan_config())(["a red square moving left", "a blue circle"])
    out = learned(torch.randn(2, 3, 2, 8, 8), torch.rand(2), ids, mask)
    assert out.shape == (2, 3, 2, 8, 8)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"variant": "cross_attention", "ffn_dim": 64}, "model.ffn_dim apply only to model.variant=wan"),
        ({"shared_modulation": True}, "model.shared_modulation is for model.variant=cross_attention"),
        ({"absolute_positions": True}, "model.variant=wan has fixed positions and norms"),
        ({"rope_axis_dims": [8, 4, 4]}, "model.variant=wan has fixed positions and norms"),
        ({"single_stream_blocks": 1}, "needs model.variant=mmdit"),
        ({"image_dim": 20}, "model.image_dim and model.added_kv_proj_dim go together"),
        ({"image_dim": 20, "added_kv_proj_dim": 16}, "equal to model.hidden_size=32"),
        (
            {"pos_embed_seq_len": 514},
            "model.pos_embed_seq_len (first-last-frame models) needs model.image_dim",
        ),
        ({"num_heads": 5}, "not divisible by model.num_heads=5"),
        ({"freq_dim": 255}, "model.freq_dim even"),
    ],
)
def test_wan_options_are_checked_with_one_line(overrides, message):
    with pytest.raises(ConfigError) as error:
        wan_config(**overrides).check()
    assert message in str(error.value)


def test_frozen_encoder_width_must_be_text_dim(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 4096}))
    wan_config(text_encoder="umt5", text_encoder_path=str(tmp_path), text_dim=4096).check()
    with pytest.raises(ConfigError, match=r"model\.text_dim=32 must be its width 4096"):
        wan_config(text_encoder="umt5", text_encoder_path=str(tmp_path)).check()
    wan_config(image_dim=20, added_kv_proj_dim=32, in_channels=7, pos_embed_seq_len=4).check()


# The released transformers' configs (diffusers' scripts/convert_wan_to_diffusers.py, the Diffusers repos'
# transformer/config.json); all have patch 1×2×2, text_dim 4096, freq_dim 256, eps 1e-6, cross_attn_norm.
RELEASED = {
    "wan21_t2v_1.3B": {"num_attention_heads": 12, "num_layers": 30, "ffn_dim": 8960, "in_channels": 16},
    "wan21_t2v_14B": {"num_attention_heads": 40, "num_layers": 40, "ffn_dim": 13824, "in_channels": 16},
    "wan22_t2v_A14B": {"num_attention_heads": 40, "num_layers": 40, "ffn_dim": 13824, "in_channels": 16},
    "wan22_ti2v_5B": {"num_attention_heads": 24, "num_layers": 30, "ffn_dim": 14336, "in_channels": 48},
}


@pytest.mark.parametrize("preset", RELEASED)
def test_presets_have_the_released_shapes(preset, tmp_path: Path):
    cfg = compose_config(["run_dir=unused", f"model={preset}"]).model
    channels = RELEASED[preset]["in_channels"]
    (tmp_path / "config.json").write_text(json.dumps({"z_dim": channels}))  # the VAE's: only z_dim is read
    shape = wan_shape(replace(cfg, vae_path=str(tmp_path)))
    common = {"patch_size": (1, 2, 2), "attention_head_dim": 128, "out_channels": channels, "text_dim": 4096,
              "freq_dim": 256, "eps": 1e-6, "cross_attn_norm": True, "image_dim": None,
              "added_kv_proj_dim": None, "rope_max_seq_len": 1024, "pos_embed_seq_len": None}  # fmt: skip
    assert shape.diffusers_config().items() >= {**common, **RELEASED[preset]}.items()
    assert (cfg.text_encoder, cfg.text_max_length, cfg.latent_space) == ("umt5", 512, "wan")
    with torch.device("meta"):
        parameters = count_parameters(WanTransformer(shape))
        assert parameters == count_parameters(diffusers.WanTransformer3DModel(**shape.diffusers_config()))
    assert parameters == pytest.approx(cfg.nominal_parameters, rel=1e-3)


def perturbed_wan(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_denoiser(wan_config(**overrides))


def test_checkpointing_policies_keep_gradients_and_names():
    cfg = wan_config()
    ids, mask = build_tokenizer(cfg)(["a blue circle moving up", "a red square"])
    x, t = torch.randn(2, 3, 2, 8, 8), torch.rand(2)
    grads = {}
    for policy in POLICIES:
        model = perturbed_wan()
        names = [n for n, _ in model.named_parameters()]
        apply_activation_checkpointing(model, policy, every=2)
        assert [n for n, _ in model.named_parameters()] == names
        model(x, t, ids, mask).square().mean().backward()
        grads[policy] = [p.grad for p in model.parameters()]
    for policy in POLICIES[1:]:
        for plain, checkpointed in zip(grads["none"], grads[policy], strict=True):
            torch.testing.assert_close(checkpointed, plain, rtol=1e-6, atol=1e-10)


def test_compiled_blocks_match_eager():
    # aot_eager: Dynamo's graph capture (with the selective checkpoint inside) and AOTAutograd's
    # partitioning, without inductor's kernel generation (as tests/test_activation_policies.py).
    torch._dynamo.reset()
    counters.clear()
    cfg = wan_config(frame_conditioning=True)
    ids, mask = build_tokenizer(cfg)(["a blue circle moving up", "a red square"])
    x, t = torch.randn(2, 3, 2, 8, 8), torch.rand(2)
    frame_mask = torch.tensor([[True, False], [False, False]])
    results = []
    for compiled in (False, True):
        model = perturbed_wan(frame_conditioning=True)
        apply_activation_checkpointing(model, "selective")
        if compiled:
            apply_block_compile(model, backend="aot_eager")
        loss = model(x, t, ids, mask, frame_mask).square().mean()
        loss.backward()
        results.append((loss.detach(), list(model.state_dict()), [p.grad for p in model.parameters()]))
    (eager_loss, eager_keys, eager_grads), (loss, keys, grads) = results
    assert keys == eager_keys
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters)
    torch.testing.assert_close(loss, eager_loss)
    for compiled_grad, eager_grad in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(compiled_grad, eager_grad)


@pytest.mark.distributed
def test_sequence_parallel_equals_one_process(tmp_path: Path):
    out = tmp_path / "report.json"
    assert_ok(run_torchrun(2, Path(__file__).parent / "scripts" / "wan_parallel_check.py", str(out)))
    report = json.loads(out.read_text())
    assert set(report) == {"t2v divides", "t2v padded", "frame conditioned padded", "i2v padded"}
    for case, gaps in report.items():
        print(f"SP=2 {case}: output {gaps['output']:.2e}, grads {gaps['grad']:.2e}")
        assert gaps["output"] <= FP32_TOLERANCE and gaps["grad"] <= FP32_TOLERANCE, case
