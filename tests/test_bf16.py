"""bf16 end to end (PyTorch runs bf16 on CPU): the demo recipe on 2 processes with validation,
samples and the synthetic evaluation during and after training, a checkpoint, an exact resume and an
export that loads; an EMA that follows the fp32 master weights under every ZeRO stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sora_train.checkpoint.store import tag_for
from sora_train.metrics import read_metrics
from sora_train.pretrained import load_model

from .conftest import assert_ok, run_module, run_torchrun, run_train
from .test_conditioning import RecordingEngine

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def events(run_dir, name: str) -> list[dict]:
    return [row for row in read_metrics(run_dir) if row.get("event") == name]


def losses(run_dir) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(run_dir) if "loss" in row}


@pytest.mark.parametrize(
    "layout",
    [["parallel=zero2"], ["parallel=zero3"], ["parallel=zero1", "parallel.sequence_parallel=2"]],
    ids=["zero2", "zero3", "zero1-sp2"],
)
def test_the_demo_recipe_in_bf16_validates_samples_resumes_exactly_and_exports(corpus, tmp_path, layout):
    args = [
        "experiment=demo", *layout, "train.precision=bf16", f"data.train={corpus / 'train'}", f"data.val={corpus / 'val'}",
        "data.num_workers=0", "wandb.mode=disabled", "train.max_steps=4", "checkpoint.every=2", "eval.val_every=2",
        "eval.val_batches=1", "train.sample_every=2", "eval.num_prompts=4", "eval.batch_size=4",
        "diffusion.sample_steps=2", "train.global_batch_size=4",
    ]  # fmt: skip
    run_dir, resumed = tmp_path / "run", tmp_path / "resumed"
    assert_ok(run_train(*args, f"run_dir={run_dir}"))
    assert [e["step"] for e in events(run_dir, "validation")] == [2, 4]
    assert all(e["val_loss"] > 0 for e in events(run_dir, "validation"))
    assert (run_dir / "samples" / tag_for(2)).is_dir() and events(run_dir, "samples")
    (scores,) = events(run_dir, "eval_synthetic")
    assert scores["num_clips"] == 4

    shutil.copytree(run_dir, resumed)
    shutil.rmtree(resumed / "checkpoints" / tag_for(4))
    assert_ok(run_train(*args, f"run_dir={resumed}"))
    assert {s: losses(resumed)[s] for s in (3, 4)} == {s: losses(run_dir)[s] for s in (3, 4)}
    ema = f"checkpoints/{tag_for(4)}/ema.safetensors"
    assert (resumed / ema).read_bytes() == (run_dir / ema).read_bytes()
    assert all(t.dtype == torch.float32 for t in load_file(run_dir / ema).values())  # the EMA stays fp32

    out = tmp_path / "export"
    assert_ok(run_module("sora_train.export", str(run_dir), "--out", str(out)))
    model, config = load_model(out)
    x = torch.randn(1, 3, config.num_frames, config.height, config.width)
    ids = torch.randint(1, 64, (1, config.model.text_max_length))
    with torch.no_grad():
        assert torch.isfinite(model(x, torch.rand(1), ids, torch.ones_like(ids, dtype=torch.bool))).all()


def test_a_bf16_step_keeps_timesteps_float32_and_forms_x_t_before_casting_it():
    from sora_train.config import DataConfig, ModelConfig, TrainConfig
    from sora_train.diffusion.draws import draw_for_samples
    from sora_train.loop.step import forward_backward, video_tokens
    from sora_train.models.denoiser import build_denoiser
    from sora_train.models.prompts import PromptEncoder

    model_cfg = ModelConfig(preset="test", hidden_size=32, depth=1, num_heads=2, patch_size=[1, 4, 4], text_dim=32,
                            text_depth=1, text_heads=2, text_vocab_size=256)  # fmt: skip
    cfg = TrainConfig(model=model_cfg, data=DataConfig(train="unused", num_frames=2, height=8, width=8),
                      run_dir="unused")  # fmt: skip
    cfg.data.caption_dropout = 0.0
    torch.manual_seed(0)
    engine = RecordingEngine(build_denoiser(model_cfg).to(torch.bfloat16))
    batch = {"x": torch.rand(3, 3, 2, 8, 8) * 2 - 1, "caption": ["a", "b", "c"], "key": ["a", "b", "c"]}
    loss, text_tokens = forward_backward(
        engine, batch, PromptEncoder(model_cfg), None, 7, cfg, torch.bfloat16
    )
    x_t, t = engine.calls[0][:2]
    assert x_t.dtype == torch.bfloat16 and t.dtype == torch.float32 and loss == loss
    assert text_tokens == 2  # the one-letter captions, their padding dropped (BOS + one word)
    tokens = video_tokens(batch["x"].shape, cfg)
    drawn = draw_for_samples(batch["key"], 7, cfg.seed, batch["x"].shape, tokens, 0.0, cfg.diffusion)
    assert torch.equal(t, drawn.t) and len(set(t.tolist())) == 3  # not rounded to bf16's 8 bits
    drawn, noise = drawn.t, drawn.noise
    x0 = batch["x"].to(torch.bfloat16)
    formed = ((1 - drawn.view(-1, 1, 1, 1, 1)) * x0.float() + drawn.view(-1, 1, 1, 1, 1) * noise).to(
        torch.bfloat16
    )
    assert torch.equal(x_t, formed)


def test_the_ema_averages_the_fp32_master_weights_sharded_under_every_zero_stage(tmp_path):
    """4 bf16 steps on 2 processes (tests/scripts/ema_master_check.py): the trainer's EMA equals one
    kept from DeepSpeed's whole fp32 master weights, exactly, while each rank holds half of it; an
    EMA of the bf16 module weights would be off by bf16 rounding; a restored EMA continues exactly."""
    out = tmp_path / "report.json"
    assert_ok(run_torchrun(2, Path(__file__).parent / "scripts" / "ema_master_check.py", str(out)))
    report = json.loads(out.read_text())
    assert set(report) == {"ZeRO-1", "ZeRO-2", "ZeRO-3"}
    for stage, figures in report.items():
        assert figures["master"] == 0.0, stage
        assert figures["naive"] > 1e-4, stage  # the module's bf16 copy is not what the EMA follows
        assert figures["share"] == pytest.approx(0.5, abs=0.01), stage
        assert figures["reloaded"] == 0.0, stage
