"""bf16 end to end (PyTorch runs bf16 on CPU): the demo recipe on 2 processes with validation,
samples and the synthetic evaluation during and after training, a checkpoint, an exact resume and an
export that loads."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from sora_train.checkpoint.store import tag_for
from sora_train.metrics import read_metrics
from sora_train.pretrained import load_model

from .conftest import assert_ok, run_module, run_train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def events(run_dir, name: str) -> list[dict]:
    return [row for row in read_metrics(run_dir) if row.get("event") == name]


def losses(run_dir) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(run_dir) if "loss" in row}


@pytest.mark.parametrize("recipe", ["zero2", "zero3"])
def test_the_demo_recipe_in_bf16_validates_samples_resumes_exactly_and_exports(corpus, tmp_path, recipe):
    args = [
        "experiment=demo", f"parallel={recipe}", "train.precision=bf16", f"data.train={corpus / 'train'}", f"data.val={corpus / 'val'}",
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
