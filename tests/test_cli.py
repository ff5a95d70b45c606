"""The command lines as a user meets them: clear one-line errors, export and sample."""

from __future__ import annotations

import pytest
import torch

from sora_train.video_io import read_video

from .conftest import FAST, assert_ok, run_module, run_train


def error_line(result) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.train=/nonexistent/shards"], "data.train=/nonexistent/shards: no such file or directory"),
        (["data.height=31"], "data.height=31 is not divisible by the patch size 2"),
        (
            ["train.global_batch_size=3", "launch.nproc_per_node=2"],
            "does not divide across 2 data-parallel ranks",
        ),
        (
            ["parallel.sequence_parallel=3", "launch.nproc_per_node=2"],
            "parallel.sequence_parallel=3 must be >= 1 and divide the world size (2 ranks)",
        ),
        (
            ["parallel.sequence_parallel=3", "launch.nproc_per_node=3"],
            "parallel.sequence_parallel=3 must divide model.num_heads=4",
        ),
        (
            ["model.rope_axis_dims=[10,12,12]"],
            "model.rope_axis_dims=[10, 12, 12] must be three even numbers summing to the head dim 32",
        ),
        (
            ["diffusion.timesteps=cosine"],
            "diffusion.timesteps must be logit_normal, uniform or mode, got 'cosine'",
        ),
        (["model=huge"], "unknown model 'huge'; choose one of: 14B, 1B, 2B, 3B, 7B, B, L, S, XL, tiny"),
        (["optim.learning_rate=1"], "unknown config key 'optim.learning_rate'"),
        (["resume=/nonexistent/ckpt"], "resume=/nonexistent/ckpt: no such checkpoint"),
        (["data.buckets=nope"], "data.buckets: unknown bucket table 'nope'"),
        (["data.buckets=video_256"], "bucket 33x256x256 is not divisible by model.patch_size=[2, 2, 2]"),
    ],
)
def test_bad_configuration_is_one_clear_line(tmp_path, overrides, message):
    result = run_train(
        f"run_dir={tmp_path / 'run'}", "data.generate_if_missing=false", *overrides, timeout=120
    )
    assert message in error_line(result)
    assert not (tmp_path / "run" / "checkpoints").exists()  # failed before any training started


def test_empty_dataset_never_trains(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_train(f"run_dir={tmp_path / 'run'}", f"data.train={tmp_path / 'empty'}", *FAST, timeout=120)
    assert "no .tar shards found" in error_line(result)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the efficient kernel exists on CUDA")
def test_an_attention_kernel_the_device_lacks_is_one_line(tmp_path, corpus):
    data = (f"data.train={corpus / 'train'}", "data.val=null")
    result = run_train(f"run_dir={tmp_path / 'run'}", *data, *FAST, "train.attention_backend=efficient")
    assert "train.attention_backend=efficient has no kernel on cpu" in error_line(result)


def test_export_and_sample_write_decodable_mp4(tmp_path, corpus):
    run_dir = tmp_path / "run"
    data = (f"data.train={corpus / 'train'}", f"data.val={corpus / 'val'}")
    steps = ("train.max_steps=2", "train.global_batch_size=2", "checkpoint.every=0")
    assert_ok(run_train(*FAST, *data, f"run_dir={run_dir}", *steps, timeout=300))
    for weights in ("ema", "raw"):
        export = tmp_path / f"export_{weights}"
        assert_ok(run_module("sora_train.export", str(run_dir), "--out", str(export), "--weights", weights))
        assert (export / "model.safetensors").is_file() and (export / "config.json").is_file()
    out = tmp_path / "clips"
    prompts = [
        "a red square moving left on a black background",
        "a green circle moving up on a black background",
    ]
    result = run_module(
        "sora_train.sample", "--model", str(tmp_path / "export_ema"), "--out", str(out),
        "--prompt", prompts[0], "--prompt", prompts[1], "--frames", "6", "--height", "32", "--width", "40",
        "--steps", "2",
    )  # fmt: skip
    assert_ok(result)
    files = sorted(out.glob("*.mp4"))
    assert [f.name for f in files] == [
        "00_a-red-square-moving-left-on-a-black-background.mp4",
        "01_a-green-circle-moving-up-on-a-black-background.mp4",
    ]
    for path in files:
        frames, _ = read_video(path)
        assert frames.shape == (6, 32, 40, 3)
    # a checkpoint (not only an export) samples directly, and a bad size is refused clearly
    assert_ok(
        run_module("sora_train.sample", "--model", str(run_dir), "--out", str(out / "ckpt"), "--prompt", "x")
    )
    bad = run_module(
        "sora_train.sample", "--model", str(run_dir), "--out", str(out), "--prompt", "x", "--height", "30"
    )
    assert "H=30 is not divisible" in error_line(bad)
