"""Pretrained-model adapters (Wan VAE, T5 / UMT5 encoders) on tiny random models saved locally.

Nothing is downloaded: every model and tokenizer is built here and written with save_pretrained.
"""

from __future__ import annotations

import pytest
import torch

from sora_train.models.text_encoders import FrozenT5Encoder, build_text_encoder
from sora_train.models.vae import LatentSpace, PixelSpace, WanVAE, build_latent_space

from .tiny_pretrained import LATENTS_MEAN, LATENTS_STD, save_tiny_t5, save_tiny_wan

# ---------------------------------------------------------------- Wan VAE


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random AutoencoderKLWan (temporal 2, spatial 2, z_dim 4) saved to disk."""
    return save_tiny_wan(tmp_path_factory.mktemp("wan_vae"))


@pytest.fixture(scope="module")
def wan(wan_dir: str) -> WanVAE:
    return WanVAE(wan_dir)


@pytest.fixture(scope="module")
def clip() -> torch.Tensor:
    """(2, 3, 9, 32, 32) pixels in [-1, 1]."""
    return torch.rand(2, 3, 9, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_wan_geometry_comes_from_the_architecture(wan: WanVAE):
    # the config's scale_factor_* defaults say (4, 8); the architecture says (2, 2)
    assert wan.vae.config.scale_factor_spatial == 8
    assert wan.compression == (2, 2, 2)
    assert wan.channels == 4
    assert isinstance(wan, LatentSpace)
    assert wan.latent_shape(9, 32, 32) == (4, 5, 16, 16)
    assert wan.latent_shape(1, 8, 6) == (4, 1, 4, 3)
    assert wan.latent_shape(5, 2, 2) == (4, 3, 1, 1)


@pytest.mark.parametrize(
    ("frames", "height", "width", "message"),
    [
        (8, 32, 32, r"1 \+ 4k frames"),
        (7, 32, 32, r"1 \+ 4k frames"),  # 1 + 3 * temporal, but diffusers would drop 2 frames
        (0, 32, 32, ">= 1"),
        (9, 31, 32, "divisible by 2"),
        (9, 32, 33, "divisible by 2"),
    ],
)
def test_wan_rejects_invalid_clip_sizes(wan: WanVAE, frames: int, height: int, width: int, message: str):
    with pytest.raises(ValueError, match=message):
        wan.latent_shape(frames, height, width)


def test_wan_encode_rejects_invalid_clip(wan: WanVAE):
    with pytest.raises(ValueError, match=r"1 \+ 4k frames"):
        wan.encode(torch.zeros(1, 3, 7, 32, 32))


def test_wan_encode_normalises_the_posterior_mode(wan: WanVAE, clip: torch.Tensor):
    latents = wan.encode(clip)
    assert latents.dtype == torch.float32
    assert latents.shape == (2, 4, 5, 16, 16)
    with torch.no_grad():
        raw = wan.vae.encode(clip).latent_dist.mode()  # (2, 4, 5, 16, 16)
    for c in range(4):
        expected = (raw[:, c] - LATENTS_MEAN[c]) / LATENTS_STD[c]
        torch.testing.assert_close(latents[:, c], expected, rtol=1e-6, atol=1e-6)
    # deterministic: the mode, not a sample
    torch.testing.assert_close(wan.encode(clip), latents, rtol=0, atol=0)
    # normalising moved the statistics: channel 0 differs from the raw mode by a real amount
    assert (latents[:, 0] - raw[:, 0]).abs().mean() > 0.1


def test_wan_decode_inverts_the_normalisation(wan: WanVAE, clip: torch.Tensor):
    latents = wan.encode(clip)
    pixels = wan.decode(latents)
    assert pixels.shape == clip.shape
    assert pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    mean = torch.tensor(LATENTS_MEAN).view(1, 4, 1, 1, 1)
    std = torch.tensor(LATENTS_STD).view(1, 4, 1, 1, 1)
    with torch.no_grad():
        raw = wan.vae.decode(latents * std + mean).sample
    torch.testing.assert_close(pixels, raw, rtol=0, atol=0)
    # decoding the un-de-normalised latents gives something else: the inverse really is applied
    with torch.no_grad():
        wrong = wan.vae.decode(latents).sample
    assert (wrong - pixels).abs().max() > 1e-3


def test_wan_bfloat16(wan_dir: str, wan: WanVAE, clip: torch.Tensor):
    half = build_latent_space("wan", wan_dir, dtype=torch.bfloat16)
    assert next(half.vae.parameters()).dtype == torch.bfloat16
    latents = half.encode(clip[:1, :, :5])
    assert latents.dtype == torch.float32
    assert latents.shape == (1, 4, 3, 16, 16)
    reference = wan.encode(clip[:1, :, :5])
    assert (latents - reference).abs().mean() < 0.05 * reference.abs().mean() + 0.05
    assert half.decode(latents).dtype == torch.float32


def test_wan_rejects_statistics_of_the_wrong_length(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    # z_dim 4 with the default 16-entry latents_mean / latents_std
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, attn_scales=[])
    vae.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="16 / 16 entries but z_dim is 4"):
        WanVAE(str(tmp_path))


# ---------------------------------------------------------------- build_latent_space


def test_build_latent_space():
    assert isinstance(build_latent_space("pixel"), PixelSpace)
    assert build_latent_space("pixel").latent_shape(7, 5, 3) == (3, 7, 5, 3)
    with pytest.raises(ValueError, match="needs path"):
        build_latent_space("wan")
    with pytest.raises(ValueError, match=r"unknown latent space 'sdxl'.*\['pixel', 'wan'\]"):
        build_latent_space("sdxl")
    with pytest.raises(ValueError, match=">= 1"):
        PixelSpace().latent_shape(0, 4, 4)


# ---------------------------------------------------------------- T5 / UMT5


@pytest.fixture(scope="module", params=["t5", "umt5"])
def t5_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    path = tmp_path_factory.mktemp(request.param)
    save_tiny_t5(request.param, path)
    return request.param, str(path)


def test_t5_encoder(t5_dir: tuple[str, str]):
    model_type, path = t5_dir
    encoder = build_text_encoder(model_type, path, max_length=8)
    assert type(encoder.model).__name__ == {"t5": "T5EncoderModel", "umt5": "UMT5EncoderModel"}[model_type]
    assert encoder.dim == 32
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.model.parameters())

    captions = ["a cat", "the dog runs on the beach at night", "", "a red ball on the beach at night"]
    embeddings, mask = encoder(captions)
    assert embeddings.shape == (4, 8, 32)
    assert embeddings.dtype == torch.float32 and embeddings.device.type == "cpu"
    assert mask.dtype == torch.bool and mask.shape == (4, 8)
    # words + </s>; the last caption (8 words) is truncated to 7 words + </s>
    assert mask.sum(dim=1).tolist() == [3, 8, 1, 8]
    assert mask[0].tolist() == [True] * 3 + [False] * 5
    assert torch.all(embeddings[~mask] == 0)
    assert torch.all(embeddings[mask].abs().sum(dim=-1) > 0)

    # the same caption gives the same embedding alone and in a batch of other captions
    alone, alone_mask = encoder(["a cat"])
    torch.testing.assert_close(alone[0], embeddings[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(alone_mask[0], mask[0])
    # ... and with more padding: the real tokens do not see the pad tokens
    longer = FrozenT5Encoder(path, max_length=16)
    padded, padded_mask = longer(["a cat"])
    assert padded.shape == (1, 16, 32)
    assert padded_mask.sum().item() == 3
    torch.testing.assert_close(padded[0, :3], embeddings[0, :3], rtol=1e-5, atol=1e-6)
    # different captions really differ
    assert (embeddings[0, :2] - embeddings[1, :2]).abs().max() > 1e-3


def test_t5_encoder_bfloat16(t5_dir: tuple[str, str]):
    _, path = t5_dir
    encoder = FrozenT5Encoder(path, max_length=8, dtype=torch.bfloat16)
    assert next(encoder.model.parameters()).dtype == torch.bfloat16
    embeddings, mask = encoder(["a cat"])
    assert embeddings.dtype == torch.float32
    assert torch.all(embeddings[~mask] == 0)


def test_build_text_encoder_rejects_unknown_names(tmp_path):
    with pytest.raises(ValueError, match=r"unknown text encoder 'clip'.*\['t5', 'umt5'\]"):
        build_text_encoder("clip", str(tmp_path), max_length=8)


def test_in_loop_encoders_run_frozen_in_the_compute_dtype_and_pass_no_gradient(wan_dir, t5_dir):
    """As the trainer builds them when training from pixels under bf16."""
    from sora_train.config import ModelConfig
    from sora_train.models.frozen import frozen_encoders
    from sora_train.models.prompts import PromptEncoder

    model_type, t5_path = t5_dir
    cfg = ModelConfig(preset="test", hidden_size=32, depth=1, num_heads=2, text_encoder=model_type,
                      text_encoder_path=t5_path, text_max_length=8)  # fmt: skip
    vae = build_latent_space("wan", wan_dir, dtype=torch.bfloat16)
    prompts = PromptEncoder(cfg, dtype=torch.bfloat16)
    report = frozen_encoders(vae, prompts)
    assert set(report) == {"vae", "text_encoder"}
    for encoder in report.values():
        assert encoder["parameters"] > 0 and encoder["trainable"] == 0
        assert encoder["dtype"] == "bfloat16" and not encoder["training_mode"]
    trainable = torch.nn.Linear(32, 4)
    with torch.enable_grad():
        latents = vae.encode(torch.rand(1, 3, 5, 16, 16) * 2 - 1)
        text, _ = prompts(["a red ball"])
        assert not latents.requires_grad and not text.requires_grad  # no graph through the encoders
        (trainable(text).sum() + latents.sum()).backward()
    assert trainable.weight.grad is not None
    assert all(p.grad is None for p in [*vae.vae.parameters(), *prompts.frozen_module.parameters()])
    assert frozen_encoders(PixelSpace(), PromptEncoder(ModelConfig(preset="test", hidden_size=32, depth=1,
                                                                   num_heads=2))) == {}  # fmt: skip
