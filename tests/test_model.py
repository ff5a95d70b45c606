"""Patches, RoPE, the DiT, the text encoder."""

from __future__ import annotations

import pytest
import torch

from sora_train.config import ModelConfig
from sora_train.models.denoiser import build_denoiser, build_tokenizer
from sora_train.models.dit import count_parameters
from sora_train.models.patch import grid_size, patchify, unpatchify
from sora_train.models.rope import apply_rope, axis_dims, grid_positions, rope_angles, sincos_embedding


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(preset="test", hidden_size=64, depth=2, num_heads=4, patch_size=[2, 4, 4], text_dim=32,
                  text_depth=1, text_heads=2, text_vocab_size=512)  # fmt: skip
    return ModelConfig(**{**fields, **overrides})


@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 4, 4), (1, 1, 1), (4, 2, 8)])
def test_patchify_round_trip(patch):
    x = torch.randn(2, 3, 8, 16, 32)
    tokens = patchify(x, patch)
    f, h, w = grid_size((8, 16, 32), patch)
    assert tokens.shape == (2, f * h * w, patch[0] * patch[1] * patch[2] * 3)
    assert torch.equal(unpatchify(tokens, (f, h, w), patch), x)


def test_patchify_token_holds_its_own_patch():
    x = torch.arange(1 * 1 * 2 * 4 * 4, dtype=torch.float32).reshape(1, 1, 2, 4, 4)
    tokens = patchify(x, (1, 2, 2))  # grid (2, 2, 2): token 3 is frame 0, row 1, col 1
    assert tokens[0, 3].tolist() == x[0, 0, 0, 2:4, 2:4].flatten().tolist()


def test_grid_size_rejects_indivisible_sides():
    with pytest.raises(ValueError, match="H=30 is not divisible by the patch size 4"):
        grid_size((8, 30, 32), (1, 4, 4))


@pytest.mark.parametrize("dims", [None, (12, 6, 6), (4, 10, 10)])
@pytest.mark.parametrize("grid", [(1, 1, 1), (4, 8, 8), (3, 5, 7), (16, 2, 9)])
def test_rope_scores_depend_only_on_relative_position(grid, dims):
    """Shifting both positions by the same (t, y, x), even beyond the grid, leaves the score unchanged."""
    head_dim = 24
    positions = grid_positions(grid)
    assert positions.shape == (grid[0] * grid[1] * grid[2], 3)
    q, k = torch.randn(1, 2, 1, head_dim), torch.randn(1, 2, 1, head_dim)
    shift = torch.tensor([5, -3, 11])

    def score(pos_q, pos_k):
        rq = apply_rope(q, rope_angles(pos_q[None], head_dim, dims=dims))
        rk = apply_rope(k, rope_angles(pos_k[None], head_dim, dims=dims))
        return (rq * rk).sum(-1)

    a, b = positions[0], positions[-1]
    torch.testing.assert_close(score(a, b), score(a + shift, b + shift), rtol=1e-4, atol=1e-4)
    if not torch.equal(a, b):  # different relative positions give different scores
        assert not torch.allclose(score(a, b), score(a, a), atol=1e-4)


def test_rope_axis_dims_must_be_even_and_fill_the_head():
    with pytest.raises(ValueError, match="must be even and sum to the head dim 24"):
        rope_angles(grid_positions((2, 2, 2)), 24, dims=(10, 6, 6))
    model = build_denoiser(tiny_config(rope_axis_dims=[8, 4, 4]))  # head dim 16
    ids, mask = build_tokenizer(tiny_config())(["x"])
    assert model(torch.randn(1, 3, 4, 16, 16), torch.rand(1), ids, mask).shape == (1, 3, 4, 16, 16)


def test_rope_preserves_norm_and_splits_axes():
    assert sum(axis_dims(24)) == 24 and all(d % 2 == 0 for d in axis_dims(24))
    x = torch.randn(2, 3, 60, 24)
    rotated = apply_rope(x, rope_angles(grid_positions((3, 4, 5)), 24))
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))


VARIANTS = {
    "cross_attention": {},
    "mmdit": {"variant": "mmdit"},
    "mmdit_single": {"variant": "mmdit", "single_stream_blocks": 1},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_dit_forward_backward_tiny(variant):
    torch.manual_seed(0)
    cfg = tiny_config(**VARIANTS[variant])
    model = build_denoiser(cfg)
    ids, mask = build_tokenizer(cfg)(["a red square moving left", ""])
    x, t = torch.randn(2, 3, 4, 16, 16), torch.rand(2)
    out = model(x, t, ids, mask)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # zero-initialised output layer
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = torch.mean((model(x, t, ids, mask) - x) ** 2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)  # no parameter goes unused
    assert sum(int(g.abs().sum() > 0) for g in grads) > 0.9 * len(
        grads
    )  # gradients reach (nearly) every tensor


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("absolute_positions", [False, True])
def test_dit_handles_any_grid_size(absolute_positions, variant):
    model = build_denoiser(tiny_config(absolute_positions=absolute_positions, **VARIANTS[variant])).eval()
    ids, mask = build_tokenizer(tiny_config())(["x"])
    for shape in [(2, 4, 4), (6, 12, 20), (4, 32, 8)]:
        assert model(torch.randn(1, 3, *shape), torch.rand(1), ids, mask).shape == (1, 3, *shape)


def test_absolute_embedding_tells_every_position_apart():
    positions = grid_positions((4, 5, 6))
    embedding = sincos_embedding(positions, 48)
    assert embedding.shape == (120, 48)
    assert torch.cdist(embedding, embedding).add(torch.eye(120)).min() > 0.1  # distinct rows
    # the first third of the dims encodes time only: tokens of one frame share it
    time_dims = axis_dims(48)[0]
    assert torch.equal(embedding[0, :time_dims], embedding[29, :time_dims])
    assert not torch.equal(embedding[0, :time_dims], embedding[30, :time_dims])


def test_tokenizer_is_stable_and_masks_padding():
    tokenizer = build_tokenizer(tiny_config())
    ids, mask = tokenizer(["A red square, moving LEFT!", "", "a red square moving left"])
    assert torch.equal(ids[0], ids[2])  # case and punctuation do not matter
    assert mask[1].tolist() == [True] + [False] * (mask.shape[1] - 1)  # the empty caption keeps BOS
    assert mask[0].sum() == 6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tiny_text_encoder_starts_with_each_word_in_its_own_token(seed):
    """Freshly initialised (the tiny preset's model.text_embed_std), a caption's output token at a
    word changes far more with that word than the other tokens do, so the demo's direction word is not
    averaged into the caption beside its colour word (at std 0.02 every token changed alike)."""
    cfg = composed_preset("tiny")
    captions = [f"a red square moving {direction} on a black background" for direction in ("left", "up")]
    ids, mask = build_tokenizer(cfg)(captions)
    torch.manual_seed(seed)
    encoder = build_denoiser(cfg).text_encoder.eval()
    with torch.no_grad():
        out = encoder(ids, mask)  # (2, T, E)
    change = (out[0] - out[1]).norm(dim=-1)[mask[0]]  # (T',) over the caption's tokens
    word = 5  # BOS a red square moving DIRECTION ...
    others = torch.cat([change[:word], change[word + 1 :]])
    assert change[word] > 3 * others.max(), change


def composed_preset(name: str) -> ModelConfig:
    """configs/model/NAME.yaml as the trainer composes it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from sora_train.recipes import config_dir

    with initialize_config_dir(str(config_dir() / "model"), version_base="1.3"):
        return ModelConfig(**OmegaConf.to_container(compose(name)))


WAN_PRESETS = ["wan21_t2v_1.3B", "wan21_t2v_14B", "wan22_ti2v_5B", "wan22_t2v_A14B"]
PRESETS = ["tiny", "S", "B", "L", "XL", "1B", "2B", "3B", "7B", "14B", *WAN_PRESETS]
VAE_CHANNELS = {"wan22_ti2v_5B": 48}  # the Wan 2.2 VAE's latents; the other Wan presets use Wan 2.1's (16)


@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_has_the_size_it_is_named_for(preset, tmp_path):
    cfg = composed_preset(preset)
    if cfg.latent_space == "wan":  # building reads only the VAE's config.json: a stub stands in for it
        (tmp_path / "config.json").write_text(f'{{"z_dim": {VAE_CHANNELS.get(preset, 16)}}}')
        cfg.vae_path = str(tmp_path)
    with torch.device("meta"):  # shapes only: a 14B model costs no memory
        parameters = count_parameters(build_denoiser(cfg))
    assert parameters == pytest.approx(cfg.nominal_parameters, rel=0.05), parameters


def test_every_preset_file_is_listed():
    from sora_train.recipes import config_dir

    assert sorted(p.stem for p in (config_dir() / "model").glob("*.yaml")) == sorted(PRESETS)


def test_14b_preset_builds_on_meta_and_counts_a_720p_5_second_clip():
    from sora_train.flops import parameter_counts, sample_flops

    cfg = composed_preset("14B")
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, int(cfg.hidden_size * cfg.mlp_ratio)) == (
        5120,
        40,
        40,
        13824,
    )
    cfg.latent_space, cfg.text_encoder = "wan", "umt5"  # how it trains: Wan latents, a frozen UMT5
    video_tokens = 21 * (720 // 16) * (1280 // 16)  # 81 frames -> 21 latent frames; 8x VAE, 2x2 patches
    flops = sample_flops(cfg, video_tokens, text_tokens=512)
    counts = parameter_counts(cfg)
    assert counts.total == pytest.approx(14e9, rel=0.05)
    # dominated by the dense layers over the video tokens (all but the cross-attention's text k/v) and
    # the video self-attention
    video_dense = counts.total - 2 * cfg.depth * cfg.hidden_size**2
    rough = 6 * video_dense * video_tokens + 12 * cfg.depth * cfg.hidden_size * video_tokens**2
    assert flops == pytest.approx(rough, rel=0.02)
    print(
        f"14B: {counts.total / 1e9:.2f}B parameters, {flops / 1e15:.1f} PFLOP per 720p 5 s clip (75,600 tokens)"
    )


def test_shared_modulation_starts_as_identity_and_trains_every_offset():
    torch.manual_seed(0)
    cfg = tiny_config(shared_modulation=True)
    model = build_denoiser(cfg)
    separate = count_parameters(build_denoiser(tiny_config()))
    d = cfg.hidden_size
    saved = (
        cfg.depth - 1
    ) * 6 * d * d - 6 * d  # one (D, 6D) projection instead of `depth`; offsets instead of biases
    assert separate - count_parameters(model) == saved
    ids, mask = build_tokenizer(cfg)(["a red square moving left", ""])
    x, t = torch.randn(2, 3, 4, 16, 16), torch.rand(2)
    assert torch.count_nonzero(model(x, t, ids, mask)) == 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(3):
        loss = torch.mean((model(x, t, ids, mask) - x) ** 2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(block.modulation_offset.abs().sum() > 0 for block in model.dit.blocks)
