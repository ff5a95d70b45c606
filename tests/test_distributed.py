"""Real torchrun processes over gloo: data-parallel correctness and exact resume."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sora_train.metrics import read_metrics

from .conftest import FAST, REPO, assert_ok, run_module, run_torchrun, run_train

pytestmark = pytest.mark.distributed
SCRIPTS = Path(__file__).parent / "scripts"


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_data_parallel_step_equals_single_process_step(tmp_path, zero_stage):
    results = {}
    for nproc in (1, 2):
        out = tmp_path / f"world{nproc}.pt"
        assert_ok(run_torchrun(nproc, SCRIPTS / "dp_step.py", str(out), str(zero_stage)))
        results[nproc] = torch.load(out, weights_only=True)
    assert abs(results[1]["loss"] - results[2]["loss"]) < 1e-5
    single, double = results[1]["weights"], results[2]["weights"]
    assert single.keys() == double.keys()
    for name, value in single.items():
        torch.testing.assert_close(double[name], value, rtol=0, atol=1e-5, msg=name)
    initial = results[1]["initial"]
    changed = [name for name in single if not torch.equal(single[name], initial[name])]
    assert len(changed) == len(single)  # every weight moved, so the equality is not vacuous


@pytest.fixture(scope="module")
def two_process_run(corpus, tmp_path_factory) -> Path:
    """8 steps on 2 processes with ZeRO-2, a checkpoint every 4 steps."""
    run_dir = tmp_path_factory.mktemp("run") / "uninterrupted"
    assert_ok(run_train(*run_args(corpus), f"run_dir={run_dir}", "launch.nproc_per_node=2"))
    return run_dir


def run_args(corpus: Path) -> list[str]:
    """The run's overrides, except where its run dir is and how its processes start.

    Three buckets with a 96-token budget: batches of 3 square clips (32 tokens each) or 2
    landscape or portrait ones (48 tokens each).
    """
    return [
        *FAST, f"data.train={corpus / 'train'}", f"data.val={corpus / 'val'}", "parallel.zero_stage=2", "train.max_steps=8", "checkpoint.every=4",
        "train.global_batch_size=4", "train.sample_prompts=[a red square moving left on a black background]",
        f"data.buckets={Path(__file__).parent / 'buckets_tiny.yaml'}", "data.tokens_per_batch=96",
    ]  # fmt: skip


def test_two_process_run_checkpoints(two_process_run):
    rows = [r for r in read_metrics(two_process_run) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    (index,) = [r for r in read_metrics(two_process_run) if r.get("event") == "data_index"]
    assert index["batch_size_by_bucket"] == {"4x16x16": 3, "4x16x24": 2, "4x24x16": 2}
    assert sum(index["samples_by_bucket"].values()) == 64 and len(index["samples_by_bucket"]) == 3
    # 192 tokens a step (2 ranks × 96) over 6, 5 or 4 clips, depending on the buckets drawn
    tokens_per_clip = {round(r["tokens_per_s"] / r["samples_per_s"], 1) for r in rows}
    assert tokens_per_clip <= {32.0, 38.4, 48.0} and len(tokens_per_clip) > 1
    assert all(len(r["batch_hash"]) == 12 for r in rows)
    checkpoints = sorted(p.name for p in (two_process_run / "checkpoints").glob("step_*"))
    assert checkpoints == ["step_0000004", "step_0000008"]
    assert (two_process_run / "checkpoints" / "latest").read_text().strip() == "step_0000008"
    for name in ("rank_00000.pt", "rank_00001.pt", "ema.safetensors", "config.json", "trainer_state.json"):
        assert (two_process_run / "checkpoints" / "step_0000008" / name).is_file(), name
    info = (two_process_run / "run_info.json").read_text()
    assert '"world_size": 2' in info and '"torch"' in info
    assert list((two_process_run / "samples" / "step_0000008").glob("*.mp4"))


def test_resume_auto_matches_uninterrupted_run(two_process_run, corpus, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(two_process_run, resumed)
    # Roll the copy back to the step-4 checkpoint, as if the run had died just after it.
    shutil.rmtree(resumed / "checkpoints" / "step_0000008")
    (resumed / "checkpoints" / "latest").write_text("step_0000004\n")
    # The uninterrupted run started its own 2 processes; this one goes through launch/torchrun.sh.
    result = subprocess.run(
        [str(REPO / "launch" / "torchrun.sh"), *run_args(corpus), "resume=auto"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHON": sys.executable, "NPROC": "2", "SORA_RUN_DIR": str(resumed)},
    )  # fmt: skip
    assert_ok(result)
    assert "resumed from" in result.stdout and "step_0000004" in result.stdout

    def by_step(run: Path) -> dict[int, dict]:
        return {r["step"]: r for r in read_metrics(run) if "loss" in r}

    reference, continued = by_step(two_process_run), by_step(resumed)
    assert sorted(continued) == list(range(1, 9))
    for step in range(5, 9):
        assert continued[step]["batch_hash"] == reference[step]["batch_hash"], step
        assert abs(continued[step]["loss"] - reference[step]["loss"]) < 1e-6, step
    final = "checkpoints/step_0000008/ema.safetensors"
    for name, value in load_file(two_process_run / final).items():
        torch.testing.assert_close(load_file(resumed / final)[name], value, rtol=0, atol=1e-6)


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_other_zero_stages_train_checkpoint_and_export(corpus, tmp_path, zero_stage):
    run_dir = tmp_path / "run"
    args = [*run_args(corpus), f"parallel.zero_stage={zero_stage}", "train.max_steps=2", "checkpoint.every=0"]
    assert_ok(run_train(*args, f"run_dir={run_dir}", "launch.nproc_per_node=2"))
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2]
    exports = {}
    for weights in ("ema", "raw"):
        out = tmp_path / weights
        assert_ok(run_module("sora_train.export", str(run_dir), "--out", str(out), "--weights", weights))
        exports[weights] = load_file(out / "model.safetensors")
    assert exports["ema"].keys() == exports["raw"].keys()
    # after 2 steps the EMA (decay warm-up 1/10, 2/11) sits between the initial and the trained weights
    assert any(not torch.equal(exports["ema"][k], exports["raw"][k]) for k in exports["raw"])


def test_a_stale_extension_build_lock_is_cleared_and_a_live_one_kept(tmp_path, monkeypatch):
    """A build killed mid-way leaves torch's lock file; later runs must not wait on it forever."""
    from torch.utils.cpp_extension import _get_build_directory

    from sora_train.parallel.dist import clear_stale_build_lock

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))

    lock = Path(_get_build_directory("some_op", verbose=False)) / "lock"
    lock.write_text("")
    assert clear_stale_build_lock("some_op") is None and lock.exists()  # a build may be running
    hour_ago = time.time() - 3600
    os.utime(lock, (hour_ago, hour_ago))
    assert clear_stale_build_lock("some_op") == lock and not lock.exists()
