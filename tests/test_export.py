"""sora-export's formats: native (the default), diffusers and the original Wan layout, from checkpoints
written here by hand (an EMA that holds exactly a tiny diffusers model's weights), bitwise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sora_train import export
from sora_train.checkpoint.manifest import describe_files, write_manifest
from sora_train.checkpoint.store import tag_for
from sora_train.config import DiffusionConfig, ModelConfig
from sora_train.pretrained import (
    EMA_WEIGHTS,
    InferenceConfig,
    load_model,
    load_pretrained,
    reading,
    save_weights,
    write_config,
)
from sora_train.pretrained.wan_layout import diffusers_to_original

from .conftest import run_module
from .test_pretrained_formats import (
    assert_same,
    fresh,
    from_pretrained_quietly,
    model_config,
    prefixed,
    quietly,
    reference,
    snapshot,
)

diffusers = pytest.importorskip("diffusers")


def wan_config(kind: str = "t2v", **changes) -> ModelConfig:
    """A variant=wan model with a frozen encoder (so the denoiser's weights are all `dit.*`); export
    never opens the encoder, so its path need not exist."""
    return model_config(kind, text_encoder="umt5", text_encoder_path="/unused/umt5", **changes)


def checkpoint(run_dir: Path, weights: dict[str, torch.Tensor], model: ModelConfig, step: int = 1) -> Path:
    """A committed checkpoint holding `weights` as its EMA and `model` in its config.json."""
    directory = run_dir / "checkpoints" / tag_for(step)
    directory.mkdir(parents=True)
    save_weights(directory / EMA_WEIGHTS, weights)
    write_config(directory, InferenceConfig(model, 4, 8, 8, 8.0, DiffusionConfig()))
    write_manifest(
        directory, describe_files(directory, [EMA_WEIGHTS, "config.json"]), step=step, world_size=1
    )
    return directory


def run_export(capsys, *args: str) -> tuple[int, list[str]]:
    """sora-export in this process: its exit code and its stderr's error lines."""
    code = export.main([str(arg) for arg in args])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("kind", ["t2v", "i2v", "flf2v"])
def test_every_format_gives_back_the_source_weights_bitwise(kind, tmp_path, capsys):
    source = reference(kind)
    run_dir = tmp_path / "run"
    checkpoint(run_dir, prefixed(source.state_dict()), wan_config(kind))
    assert run_export(capsys, run_dir, "--out", tmp_path / "diffusers", "--format", "diffusers") == (0, [])
    assert_same(from_pretrained_quietly(tmp_path / "diffusers").state_dict(), source.state_dict())
    sharded = tmp_path / "sharded"
    assert (
        run_export(capsys, run_dir, "--out", sharded, "--format", "diffusers", "--max-shard-size", "4KB")[0]
        == 0
    )
    assert (
        len(
            json.loads((sharded / "diffusion_pytorch_model.safetensors.index.json").read_text())["weight_map"]
        )
        > 0
    )
    assert_same(from_pretrained_quietly(sharded).state_dict(), source.state_dict())
    if kind == "t2v":  # the original fixes the image width, so only the text-to-video model writes as wan
        assert run_export(capsys, run_dir, "--out", tmp_path / "wan", "--format", "wan") == (0, [])
        stored = load_file(tmp_path / "wan" / "diffusion_pytorch_model.safetensors")
        assert_same(stored, diffusers_to_original(source.state_dict()))
        model = fresh(kind)
        load_pretrained(model, tmp_path / "wan")
        assert_same(snapshot(model.dit), source.state_dict())
    assert run_export(capsys, run_dir, "--out", tmp_path / "native") == (0, [])  # native stays the default
    assert_same(load_file(tmp_path / "native" / "model.safetensors"), prefixed(source.state_dict()))
    denoiser, _ = load_model(tmp_path / "native")
    assert_same(denoiser.state_dict(), prefixed(source.state_dict()))
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_raw_weights_go_through_every_format(tmp_path, capsys, monkeypatch):
    """--weights raw hands the consolidated ZeRO weights (here: stood in for) to the same writers."""
    source = reference()
    ema = {name: torch.zeros_like(t) for name, t in prefixed(source.state_dict()).items()}
    directory = checkpoint(tmp_path / "run", ema, wan_config())
    monkeypatch.setattr(export, "consolidated_weights", lambda path: prefixed(source.state_dict()))
    for format in ("diffusers", "wan", "native"):
        out = tmp_path / format
        assert run_export(capsys, directory, "--out", out, "--format", format, "--weights", "raw") == (0, [])
    assert_same(from_pretrained_quietly(tmp_path / "diffusers").state_dict(), source.state_dict())
    model = fresh()
    load_pretrained(model, tmp_path / "wan")
    assert_same(snapshot(model.dit), source.state_dict())
    assert_same(load_file(tmp_path / "native" / "model.safetensors"), prefixed(source.state_dict()))


def _bad_checkpoints(tmp_path: Path) -> dict[str, tuple[Path, tuple[str, ...], str]]:
    weights = prefixed(reference().state_dict())
    learned = dict(weights) | {"text_encoder.embed.weight": torch.zeros(4, 16)}
    tiny_dit = ModelConfig(preset="t", hidden_size=16, depth=2, num_heads=2, text_dim=16)
    return {
        "not a wan model": (
            checkpoint(tmp_path / "dit", weights, tiny_dit), ("--format", "diffusers"),
            "--format diffusers needs a model.variant=wan checkpoint; step_0000001 holds model.variant=cross_attention",
        ),
        "a learned text encoder": (
            checkpoint(tmp_path / "learned", learned, model_config()), ("--format", "wan"),
            "text_encoder.embed.weight is not part of the transformer",
        ),
        "config and shapes differ": (
            checkpoint(tmp_path / "ffn", weights, wan_config(ffn_dim=64)), ("--format", "diffusers"),
            "the weights do not fit the model config: 6 mis-shaped (dit.blocks.0.ffn.net.0.proj.bias: [32], the config",
        ),
        "not a checkpoint": (tmp_path / "nothing", ("--format", "diffusers"), "is not a checkpoint nor a run dir"),
    }  # fmt: skip


@pytest.mark.parametrize(
    "case", ["not a wan model", "a learned text encoder", "config and shapes differ", "not a checkpoint"]
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, tmp_path, capsys):
    source, args, message = _bad_checkpoints(tmp_path)[case]
    out = tmp_path / "out"
    code, errors = run_export(capsys, source, "--out", out, *args)
    assert code == 2 and len(errors) == 1 and message in errors[0], errors
    assert not out.exists()


def test_too_old_a_diffusers_and_a_used_out_are_refused(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    checkpoint(run_dir, prefixed(reference().state_dict()), wan_config())
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    code, errors = run_export(capsys, run_dir, "--out", out, "--format", "diffusers")
    assert code == 2 and errors == [
        f"error: {out} already exists and is not empty; choose another --out or empty it"
    ]
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    monkeypatch.setattr(reading, "installed_diffusers_version", lambda: "0.32.2")
    code, errors = run_export(capsys, run_dir, "--out", tmp_path / "new", "--format", "diffusers")
    assert code == 2 and len(errors) == 1 and "needs diffusers>=0.33.0" in errors[0]
    assert not (tmp_path / "new").exists()
    assert run_export(capsys, run_dir, "--out", tmp_path / "wan", "--format", "wan") == (
        0,
        [],
    )  # no diffusers needed


def test_the_command_line_exports_diffusers(tmp_path):
    source = reference()
    run_dir = tmp_path / "run"
    checkpoint(run_dir, prefixed(source.state_dict()), wan_config())
    result = run_module(
        "sora_train.export", str(run_dir), "--out", str(tmp_path / "out"), "--format", "diffusers"
    )
    assert result.returncode == 0, result.stderr
    assert "exported ema weights to" in result.stdout
    assert_same(from_pretrained_quietly(tmp_path / "out").state_dict(), source.state_dict())
    bad = run_module("sora_train.export", str(run_dir), "--out", str(tmp_path / "x"), "--format", "onnx")
    assert bad.returncode == 2 and "invalid choice: 'onnx'" in bad.stderr


def test_a_whole_wan_pipeline_loads_in_diffusers_and_generates(tmp_path, capsys):
    """--format diffusers-pipeline: the transformer with the run's tiny Wan VAE and umT5, loadable by
    `WanPipeline.from_pretrained` without warnings, and able to generate."""
    from .tiny_pretrained import save_tiny_t5, save_tiny_wan

    vae_path = save_tiny_wan(tmp_path / "vae")
    save_tiny_t5("umt5", tmp_path / "umt5")
    cfg = model_config(latent_space="wan", vae_path=vae_path, text_encoder="umt5",
                       text_encoder_path=str(tmp_path / "umt5"), text_dim=32)  # fmt: skip
    cfg.check()
    source = reference(in_channels=4, out_channels=4, text_dim=32)
    run_dir = tmp_path / "run"
    directory = checkpoint(run_dir, prefixed(source.state_dict()), cfg)
    out = tmp_path / "pipeline"
    assert run_export(capsys, run_dir, "--out", out, "--format", "diffusers-pipeline") == (0, [])
    pipe = quietly(lambda: diffusers.WanPipeline.from_pretrained(out))
    assert_same(pipe.transformer.state_dict(), source.state_dict())
    assert pipe.scheduler.config.shift == 1.0 and type(pipe.text_encoder).__name__ == "UMT5EncoderModel"
    kwargs = {"num_frames": 5, "height": 16, "width": 16, "num_inference_steps": 2}
    latents = pipe("a cat runs", output_type="latent", **kwargs).frames
    assert latents.shape[:2] == (1, 4) and torch.isfinite(latents).all()  # (B, C, f, h, w)
    assert np.isfinite(pipe("a cat runs", output_type="np", **kwargs).frames).all()
    # an image-to-video model or one without the pretrained parts makes no WanPipeline
    learned = checkpoint(tmp_path / "learned", prefixed(reference().state_dict()), wan_config())
    code, errors = run_export(capsys, learned, "--out", tmp_path / "bad", "--format", "diffusers-pipeline")
    assert code == 2 and "needs model.latent_space=wan and model.text_encoder=t5|umt5" in errors[0]
    assert not (tmp_path / "bad").exists() and directory.is_dir()
