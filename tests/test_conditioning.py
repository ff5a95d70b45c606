"""Frame conditioning (image-to-video, extension, interpolation) and loss weighting: the masks a
strategy draws, the loss they leave, the sampler holding given frames, and sora-sample's flags."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from einops import rearrange
from PIL import Image

from sora_train.config import DataConfig, DiffusionConfig, ModelConfig, TrainConfig
from sora_train.data.decode import to_unit_range
from sora_train.diffusion.conditioning import (
    cover_given_frames,
    draw_frame_mask,
    draw_strategies,
    strategy_mask,
)
from sora_train.diffusion.draws import sample_generator
from sora_train.diffusion.flow import cosmap_weight, flow_loss, interpolate, velocity_target
from sora_train.diffusion.sampler import euler_sample
from sora_train.diffusion.timesteps import training_timesteps
from sora_train.generate import conditioning_latents, fill_clip, generate_videos
from sora_train.loop.step import forward_backward, video_tokens
from sora_train.models.denoiser import build_denoiser
from sora_train.models.prompts import PromptEncoder
from sora_train.pretrained import InferenceConfig, save_weights, write_config
from sora_train.video_io import read_video, write_mp4

from .tiny_pretrained import save_tiny_wan
from .video_files import gradient_frames


def tiny_model_config(**overrides) -> ModelConfig:
    """A pixel-space DiT with the frame-conditioning channel, small enough for milliseconds per call."""
    fields = dict(preset="test", hidden_size=32, depth=1, num_heads=2, patch_size=[1, 4, 4], text_dim=32,
                  text_depth=1, text_heads=2, text_vocab_size=256, frame_conditioning=True)  # fmt: skip
    return ModelConfig(**{**fields, **overrides})


def busy_model(cfg: ModelConfig) -> torch.nn.Module:
    """A model whose output is not zero (the output layer starts at zero), so sampling moves frames."""
    torch.manual_seed(0)
    model = build_denoiser(cfg).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.1)
    return model


def diffusion(**conditioning: float) -> DiffusionConfig:
    return DiffusionConfig(conditioning=conditioning or {"none": 1.0}, conditioning_first_k=2)


# --- strategies and masks ---


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ("none", [0, 0, 0, 0, 0]),
        ("first", [1, 0, 0, 0, 0]),
        ("first_k", [1, 1, 0, 0, 0]),
        ("last", [0, 0, 0, 0, 1]),
        ("first_last", [1, 0, 0, 0, 1]),
        ("random", [0, 1, 0, 1, 0]),
    ],
)
def test_each_strategy_keeps_its_frames(strategy, expected):
    uniform = torch.tensor([0.9, 0.1, 0.5, 0.2, 0.3])
    mask = strategy_mask(strategy, 5, first_k=2, rate=0.25, uniform=uniform)
    assert mask.tolist() == [bool(v) for v in expected]


def test_strategies_always_leave_a_frame_to_denoise():
    assert strategy_mask("first_k", 3, first_k=7, rate=0.25, uniform=torch.zeros(3)).tolist() == [
        True,
        True,
        False,
    ]
    assert strategy_mask("first_last", 2, first_k=2, rate=0.25, uniform=torch.zeros(2)).tolist() == [
        True,
        False,
    ]
    # every draw under the rate: the frame with the largest draw stays noisy
    uniform = torch.tensor([0.1, 0.3, 0.2, 0.05])
    assert strategy_mask("random", 4, first_k=2, rate=0.5, uniform=uniform).tolist() == [
        True,
        False,
        True,
        True,
    ]
    with pytest.raises(ValueError, match="unknown conditioning strategy 'middle'"):
        strategy_mask("middle", 4, first_k=2, rate=0.5, uniform=uniform)


def test_images_are_never_conditioned():
    for strategy in ("none", "first", "first_k", "last", "first_last", "random"):
        assert not strategy_mask(strategy, 1, first_k=2, rate=0.99, uniform=torch.zeros(1)).any()
    everything = diffusion(first=0.2, first_k=0.2, last=0.2, first_last=0.2, random=0.2)
    assert not draw_frame_mask(64, 1, everything, torch.Generator().manual_seed(0)).any()


def test_strategy_probabilities_and_random_rate_are_respected():
    probabilities = {"random": 0.5, "none": 0.2, "first": 0.3}
    strategies = draw_strategies(20000, probabilities, torch.Generator().manual_seed(0))
    for name, p in probabilities.items():
        assert abs(strategies.count(name) / len(strategies) - p) < 0.015
    masks = draw_frame_mask(4000, 8, diffusion(random=1.0), torch.Generator().manual_seed(1))
    assert abs(masks.float().mean().item() - 0.25) < 0.01
    assert not masks.all(dim=1).any()


def test_masks_follow_the_generator_alone():
    config = diffusion(none=0.4, first=0.3, random=0.3)
    reordered = diffusion(random=0.3, first=0.3, none=0.4)

    def masks(seed: int, cfg: DiffusionConfig) -> torch.Tensor:
        return draw_frame_mask(32, 6, cfg, torch.Generator().manual_seed(seed))

    assert torch.equal(masks(0, config), masks(0, config))
    assert torch.equal(masks(0, config), masks(0, reordered))  # the dict's order does not matter
    assert not torch.equal(masks(0, config), masks(1, config))
    # the generator advances by the same amount whatever was drawn
    a, b = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    draw_frame_mask(32, 6, config, a)
    draw_frame_mask(32, 6, diffusion(first=1.0), b)
    assert torch.equal(a.get_state(), b.get_state())
    assert not diffusion().conditions_frames() and config.conditions_frames()


# --- the loss ---


def test_conditioned_frames_are_clean_in_x_t_and_carry_no_loss():
    torch.manual_seed(0)
    x0, noise, t = torch.randn(3, 2, 5, 4, 4), torch.randn(3, 2, 5, 4, 4), torch.tensor([0.3, 0.6, 0.9])
    frame_mask = torch.tensor([[1, 0, 0, 0, 0], [1, 0, 0, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    output = torch.randn(3, 2, 5, 4, 4, requires_grad=True)
    seen = {}

    def predict(x_t, t_):
        seen["x_t"] = x_t
        return output

    loss = flow_loss(predict, x0, noise, t, frame_mask)
    loss.backward()
    held = rearrange(frame_mask, "b f -> b 1 f 1 1").expand_as(x0)
    assert torch.equal(seen["x_t"][held], x0[held])
    assert torch.equal(seen["x_t"][~held], interpolate(x0, noise, t)[~held])
    assert torch.count_nonzero(output.grad[held]) == 0
    assert torch.count_nonzero(output.grad[~held]) == (~held).sum()
    expected = ((output - velocity_target(x0, noise)) ** 2)[~held].mean()
    torch.testing.assert_close(loss, expected)


def test_cosmap_weight_is_sd3s_density():
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    expected = [2 / math.pi, 2 / (math.pi * 0.625), 4 / math.pi, 2 / (math.pi * 0.625), 2 / math.pi]
    torch.testing.assert_close(cosmap_weight(t), torch.tensor(expected))
    grid = torch.linspace(0, 1, 100001, dtype=torch.float64)
    assert abs(torch.trapezoid(cosmap_weight(grid), grid).item() - 1.0) < 1e-6  # mean 1 under uniform t
    x0, noise, t = torch.randn(2, 3, 2, 4, 4), torch.randn(2, 3, 2, 4, 4), torch.tensor([0.1, 0.5])
    errors = velocity_target(x0, noise) ** 2  # the prediction 0 misses the whole velocity
    weighted = flow_loss(lambda x_t, t_: torch.zeros_like(x_t), x0, noise, t, weighting="cosmap")
    expected_loss = (errors * cosmap_weight(t).view(2, 1, 1, 1, 1)).mean()
    torch.testing.assert_close(weighted, expected_loss)
    with pytest.raises(ValueError, match="unknown loss weighting 'snr'"):
        flow_loss(lambda x_t, t_: x_t, x0, noise, t, weighting="snr")


class RecordingEngine:
    """What `forward_backward` needs of a DeepSpeed engine: a device, a forward, a backward."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.device, self.calls = model, torch.device("cpu"), []

    def __call__(self, *args):
        self.calls.append(args)
        return self.model(*args)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()


def train_config(**conditioning: float) -> TrainConfig:
    cfg = TrainConfig(
        model=tiny_model_config(), data=DataConfig(train="unused", num_frames=5, height=16, width=16),
        run_dir="unused",
    )  # fmt: skip
    cfg.diffusion = diffusion(**conditioning)
    return cfg


def video_batch(size: int, seed: int = 0) -> dict:
    frames = [rearrange(gradient_frames(5, 16, 16, seed=seed + i), "f h w c -> c f h w") for i in range(size)]
    captions = [f"clip {i}" for i in range(size)]
    return {
        "x": torch.from_numpy(np.stack(frames)),
        "caption": captions,
        "key": [f"k{seed + i}" for i in range(size)],
    }


def test_an_unconditioned_step_draws_dropout_timestep_and_noise_from_each_samples_key_and_step():
    cfg = train_config()
    engine, prompts = RecordingEngine(build_denoiser(cfg.model)), PromptEncoder(cfg.model)
    batch = video_batch(2)
    forward_backward(engine, batch, prompts, None, 7, cfg, torch.float32)
    x_t, t = engine.calls[0][:2]
    x0 = to_unit_range(batch["x"])
    for index, key in enumerate(batch["key"]):  # caption dropout, timestep, noise; nothing else
        expected = sample_generator(cfg.seed, key, 7)
        torch.rand(1, generator=expected)
        drawn = training_timesteps(1, video_tokens(batch["x"].shape, cfg), expected, cfg.diffusion)
        noise = torch.randn(batch["x"].shape[1:], generator=expected)
        assert torch.equal(t[index : index + 1], drawn)
        torch.testing.assert_close(x_t[index], (1 - drawn) * x0[index] + drawn * noise, rtol=0, atol=1e-6)
    assert engine.calls[0][4] is None
    alone = RecordingEngine(engine.model)  # the second sample alone draws what it drew beside the first
    forward_backward(
        alone, {name: value[1:] for name, value in batch.items()}, prompts, None, 7, cfg, torch.float32
    )
    assert torch.equal(alone.calls[0][0][0], x_t[1]) and torch.equal(alone.calls[0][1], t[1:])


def test_a_short_conditioned_training_run():
    cfg = train_config(none=0.25, first=0.25, first_last=0.25, random=0.25)
    cfg.diffusion.loss_weighting = "cosmap"
    torch.manual_seed(0)
    model = build_denoiser(cfg.model)
    engine, prompts = RecordingEngine(model), PromptEncoder(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = video_batch(4)

    def step(number: int) -> float:
        optimizer.zero_grad()
        return forward_backward(engine, batch, prompts, None, number, cfg, torch.float32).loss

    before = step(99)  # the same draws before and after training
    for number in range(1, 21):
        step(number)
        optimizer.step()
    after = step(99)
    assert math.isfinite(after) and after < 0.8 * before
    masks = torch.cat([call[4] for call in engine.calls])  # (steps·B, f)
    assert masks.any(dim=1).float().mean() > 0.5 and not masks.all(dim=1).any()
    x0 = to_unit_range(batch["x"])
    for x_t, _, _, _, frame_mask in engine.calls:
        held = rearrange(frame_mask, "b f -> b 1 f 1 1").expand_as(x_t)
        assert torch.equal(x_t[held], x0[held])


# --- sampling ---


def test_sampler_returns_given_frames_bit_for_bit():
    torch.manual_seed(0)
    noise, clean = torch.randn(2, 3, 5, 4, 4), torch.randn(2, 3, 5, 4, 4)
    frame_mask = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 1]], dtype=torch.bool)
    held = rearrange(frame_mask, "b f -> b 1 f 1 1").expand_as(clean)
    inputs = []

    def velocity(x, t, conditional):
        inputs.append(x.clone())
        return torch.sin(3 * x) + (0.5 if conditional else -0.5) * t.view(-1, 1, 1, 1, 1)

    sample = euler_sample(velocity, noise, steps=4, cfg_scale=3.0, clean=clean, frame_mask=frame_mask)
    assert torch.equal(sample[held], clean[held])
    assert not torch.equal(sample[~held], noise[~held])
    assert len(inputs) == 8 and all(torch.equal(x[held], clean[held]) for x in inputs)
    with pytest.raises(ValueError, match="both the clean latents and the frame mask"):
        euler_sample(velocity, noise, steps=1, clean=clean)


def test_given_pixel_frames_cover_whole_latent_frames():
    # causal VAE, 4 pixel frames per latent frame after the first: 17 pixel frames -> 5 latent frames
    assert cover_given_frames(1, 0, 17, 4).mask().tolist() == [True, False, False, False, False]
    extension = cover_given_frames(7, 0, 17, 4)  # 1 + 4 frames cover two latent frames; 2 are dropped
    assert (extension.head, extension.head_pixels) == (2, 5)
    both = cover_given_frames(1, 6, 17, 4)
    assert both.mask().tolist() == [True, False, False, False, True] and both.tail_pixels == 4
    assert cover_given_frames(1, 1, 5, 1).mask().tolist() == [True, False, False, False, True]  # pixel space
    with pytest.raises(ValueError, match="1 last frame\\(s\\) cover no whole latent frame"):
        cover_given_frames(1, 1, 17, 4)
    with pytest.raises(ValueError, match="cover all 5 latent frames"):
        cover_given_frames(9, 8, 17, 4)
    with pytest.raises(ValueError, match="cover all 5 latent frames"):
        cover_given_frames(5, 0, 5, 1)


def test_fill_clip_copies_the_nearer_given_frame():
    head, tail = np.full((2, 1, 1, 3), 1, np.uint8), np.full((1, 1, 1, 3), 9, np.uint8)
    head[0] = 0
    assert fill_clip(head, tail, 7)[:, 0, 0, 0].tolist() == [0, 1, 1, 1, 9, 9, 9]
    assert fill_clip(head, tail[:0], 4)[:, 0, 0, 0].tolist() == [0, 1, 1, 1]
    assert fill_clip(head[:0], tail, 3)[:, 0, 0, 0].tolist() == [9, 9, 9]


def test_a_causal_vae_encodes_the_start_frames_as_training_sees_them(tmp_path):
    from sora_train.models.vae import WanVAE

    vae = WanVAE(save_tiny_wan(tmp_path / "vae"))  # 2 pixel frames per latent frame after the first
    video = gradient_frames(9, 16, 16)  # (F, H, W, 3): 9 pixel frames -> 5 latent frames
    whole = vae.encode(to_unit_range(rearrange(torch.from_numpy(video), "f h w c -> 1 c f h w")))
    latents, mask = conditioning_latents(vae, (9, 16, 16), video[:4], None)  # 4 frames -> 2 latent frames
    assert mask.tolist() == [True, True, False, False, False]
    # the last 3 of the 4 given frames become the clip's first 3: the video's frames 1..3
    shifted = vae.encode(to_unit_range(rearrange(torch.from_numpy(video[1:6]), "f h w c -> 1 c f h w")))
    torch.testing.assert_close(latents[:, :, :2], shifted[:, :, :2], rtol=0, atol=0)
    exact, _ = conditioning_latents(vae, (9, 16, 16), video[:3], None)
    torch.testing.assert_close(exact[:, :, :2], whole[:, :, :2], rtol=0, atol=0)
    assert not torch.equal(exact[:, :, 2], whole[:, :, 2])  # the generated frames' latents differ


def test_generate_with_an_image_starts_on_that_image():
    cfg = tiny_model_config()
    model = busy_model(cfg)
    image = gradient_frames(1, 16, 16, seed=3)  # (1, H, W, 3)
    last = gradient_frames(1, 16, 16, seed=5)
    sampling = DiffusionConfig(sample_steps=3, cfg_scale=3.0)
    clips = generate_videos(
        model, cfg, ["a", "b"], (5, 16, 16), sampling, first_frames=image, last_frames=last
    )
    assert clips.shape == (2, 5, 16, 16, 3)
    difference = np.abs(clips.astype(int) - image.astype(int))  # (B, F, H, W, 3)
    assert difference[:, 0].max() <= 1
    assert np.abs(clips[:, -1].astype(int) - last[0].astype(int)).max() <= 1
    assert difference[:, 2].mean() > 20  # the frames between are generated
    with pytest.raises(ValueError, match="not built with frame_conditioning"):
        generate_videos(build_denoiser(tiny_model_config(frame_conditioning=False)),
                        tiny_model_config(frame_conditioning=False), ["a"], (5, 16, 16), sampling,
                        first_frames=image)  # fmt: skip
    with pytest.raises(ValueError, match=r"must be uint8 \(P, 16, 16, 3\)"):
        generate_videos(model, cfg, ["a"], (5, 16, 16), sampling, first_frames=image[:, :8])


# --- sora-sample ---


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An export of a tiny frame-conditioning model (and of one without): 5 frames of 16 × 16 at 8 fps."""
    root = tmp_path_factory.mktemp("exports")
    for name, conditioning in (("conditioned", True), ("plain", False)):
        cfg = tiny_model_config(frame_conditioning=conditioning)
        directory = root / name
        directory.mkdir()
        sampling = DiffusionConfig(sample_steps=2, cfg_scale=2.0)
        write_config(
            directory, InferenceConfig(cfg, num_frames=5, height=16, width=16, fps=8.0, diffusion=sampling)
        )
        save_weights(directory / "model.safetensors", busy_model(cfg).state_dict())
    return root


def soft_image(size: int, color: tuple[int, int, int]) -> np.ndarray:
    """(size, size, 3) uint8: one colour, darkening gently downwards (what H.264 keeps well)."""
    ramp = np.linspace(0, 40, size)[:, None, None]  # (H, 1, 1)
    return np.broadcast_to(np.array(color) - ramp, (size, size, 3)).round().astype(np.uint8)


def write_image(path: Path, frame: np.ndarray) -> str:
    Image.fromarray(frame).save(path)
    return str(path)


def test_sample_cli_image_to_video_and_interpolation(tmp_path, exported):
    from .conftest import assert_ok, run_module

    first, last = soft_image(32, (200, 80, 60)), soft_image(16, (60, 120, 220))  # the first is resized
    result = run_module(
        "sora_train.sample", "--model", str(exported / "conditioned"), "--out", str(tmp_path / "out"),
        "--prompt", "x", "--image", write_image(tmp_path / "first.png", first),
        "--last-image", write_image(tmp_path / "last.png", last),
    )  # fmt: skip
    assert_ok(result)
    clip, _ = read_video(result.stdout.split()[-1])
    assert clip.shape == (5, 16, 16, 3)
    error = lambda a, b: np.abs(a.astype(int) - b.astype(int)).mean()  # noqa: E731
    assert error(clip[0], soft_image(16, (200, 80, 60))) < 4 and error(clip[-1], last) < 4  # up to H.264
    assert error(clip[2], last) > 20


def test_sample_cli_extends_a_video(tmp_path, exported, capsys):
    from sora_train.sample import main

    source = gradient_frames(12, 16, 16, seed=2)
    video = write_mp4(tmp_path / "source.mp4", source, fps=8.0)
    out = tmp_path / "out"
    args = [
        "--model",
        str(exported / "conditioned"),
        "--out",
        str(out),
        "--prompt",
        "x",
        "--video",
        str(video),
    ]
    assert main([*args, "--context-frames", "3"]) == 0
    clip, _ = read_video(capsys.readouterr().out.split()[-1])
    context, _ = read_video(video)
    assert np.abs(clip[:3].astype(int) - context[-3:].astype(int)).mean() < 6  # the video's last 3 frames
    assert np.abs(clip[3].astype(int) - context[-1].astype(int)).mean() > 20
    with pytest.raises(SystemExit) as exited:
        main([*args[:-2], "--context-frames", "3"])
    assert exited.value.code == 2 and "--context-frames needs --video" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("model", "flags", "message"),
    [
        ("plain", ["--image", "IMAGE"], "need a model trained with model.frame_conditioning=true"),
        ("conditioned", ["--image", "/nonexistent.png"], "/nonexistent.png: no such image file"),
        ("conditioned", ["--video", "/nonexistent.mp4"], "/nonexistent.mp4: no such video file"),
        ("conditioned", ["--video", "NOT_AN_IMAGE"], "not a readable video"),
        ("conditioned", ["--last-image", "NOT_AN_IMAGE"], "not a readable image"),
        ("conditioned", ["--video", "VIDEO", "--context-frames", "9"], "cover all 5 latent frames"),
    ],
)
def test_sample_cli_refuses_bad_frames_clearly(tmp_path, exported, capsys, model, flags, message):
    from sora_train.sample import main

    paths = {
        "IMAGE": write_image(tmp_path / "image.png", gradient_frames(1, 16, 16)[0]),
        "VIDEO": str(write_mp4(tmp_path / "video.mp4", gradient_frames(12, 16, 16), fps=8.0)),
        "NOT_AN_IMAGE": str(tmp_path / "text.png"),
    }
    Path(paths["NOT_AN_IMAGE"]).write_text("not an image")
    argv = ["--model", str(exported / model), "--out", str(tmp_path / "out"), "--prompt", "x"]
    assert main([*argv, *(paths.get(flag, flag) for flag in flags)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert any(line.startswith("error:") and message in line for line in lines), lines
    assert not (tmp_path / "out").exists()
