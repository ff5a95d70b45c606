"""Data and sequence parallelism equal one process: outputs, gradients, training steps at ZeRO-2 and
ZeRO-3, identical weights on every rank, and the minute-long recipe scaled down, resumed across a
change of the rank grid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sora_train.checkpoint.store import tag_for
from sora_train.metrics import read_metrics

from .conftest import FAST, assert_ok, run_torchrun, run_train
from .test_distributed import by_step

pytestmark = pytest.mark.distributed

SCRIPTS = Path(__file__).parent / "scripts"


@pytest.fixture(scope="module")
def parallel_report(tmp_path_factory) -> dict:
    """tests/scripts/parallel_check.py's report: SP=2 and DP=2 on 2 processes against a plain model."""
    out = tmp_path_factory.mktemp("parallel") / "report.json"
    assert_ok(run_torchrun(2, SCRIPTS / "parallel_check.py", str(out)))
    return json.loads(out.read_text())


def assert_trains_like_one_process(run: dict, name: str) -> None:
    """3 DeepSpeed steps against a plain torch model on the whole batch: same losses, same weights."""
    for loss, reference in zip(run["losses"], run["reference_losses"], strict=True):
        assert loss == pytest.approx(reference, rel=1e-6), name
    assert run["weights"] < 1e-5 and run["least_moved"] > 1e-4, name  # every weight moved, identically
    assert run["ema"] < 1e-5, name  # the EMA (gathered from its shards) equals a plain one


def test_sequence_parallel_outputs_gradients_and_steps_equal_the_whole_sequence(parallel_report):
    forward = parallel_report["forward"]
    # 32 tokens split 16 + 16; 27 padded to 28; MM-DiT's text stream whole on both ranks
    variants = ("cross_attention", "mmdit", "mmdit_single")
    assert set(forward) == {f"{variant} {grid}" for variant in variants for grid in ("divides", "padded")}
    for grid, gaps in forward.items():
        assert gaps["output"] <= 1e-6 * gaps["output_scale"], grid
        assert gaps["grad"] <= 1e-5 * gaps["grad_scale"], grid
    for name in ("SP ZeRO-2", "SP ZeRO-3"):
        assert_trains_like_one_process(parallel_report["training"][name], name)


def test_data_parallel_steps_equal_one_process_and_every_rank_holds_the_same_weights(parallel_report):
    for name in ("DP ZeRO-2", "DP ZeRO-3"):
        assert_trains_like_one_process(parallel_report["training"][name], name)
    for name in ("DP ZeRO-2", "SP ZeRO-2"):  # ZeRO-2: each rank holds every weight
        assert parallel_report["training"][name]["between_ranks"] == 0.0, name
    for name in parallel_report["training"]:  # each rank averages only its part of the master weights
        assert parallel_report["training"][name]["ema_bytes_share"] == pytest.approx(0.5, abs=0.01), name


def test_minute_recipe_scaled_down_trains_with_sp2_as_with_sp1(corpus, tmp_path):
    """The minute-long 720p recipe (ZeRO-3, activation checkpointing, SP) with a tiny model and 16-pixel clips.

    Steps 1-2 on one process (SP=1); steps 3-4 resumed from its step-2 checkpoint on 2 processes as one
    sequence-parallel group (SP=2): the same samples, and the losses of an uninterrupted SP=1 run. The
    model is the MM-DiT variant with a single-stream block, so its joint attention runs through this
    whole path (`parallel_check.py` covers the cross-attention DiT's DeepSpeed steps under SP).
    """
    args = [
        "experiment=minute_720p", "model=tiny", *FAST, "data=synthetic", "model.latent_space=pixel",
        "model.variant=mmdit", "model.single_stream_blocks=1",
        f"data.train={corpus / 'train'}", f"data.val={corpus / 'val'}", "data.fps=8", "data.frame_stride=2",
        f"data.buckets={Path(__file__).parent / 'buckets_tiny.yaml'}", "train.precision=fp32",
        "train.global_batch_size=2", "train.max_steps=4", "checkpoint.every=2", "eval.val_every=2",
        "eval.val_batches=2", "train.sample_prompts=[a red square moving left on a black background]",
    ]  # fmt: skip
    whole, split = tmp_path / "sp1", tmp_path / "sp2"
    assert_ok(run_train(*args, "parallel.sequence_parallel=1", f"run_dir={whole}"))
    assert_ok(run_train(
        *args, "parallel.sequence_parallel=2", "launch.nproc_per_node=2", f"run_dir={split}",
        f"resume={whole / 'checkpoints' / tag_for(2)}",
    ))  # fmt: skip
    reference, resumed = by_step(whole), by_step(split)
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step]["batch_hash"] == reference[step]["batch_hash"]
        assert resumed[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-4)
    validations = [r for r in read_metrics(split) if r.get("event") == "validation"]
    expected = [r for r in read_metrics(whole) if r.get("event") == "validation" and r["step"] == 4]
    assert len(validations) == 1 and len(expected) == 1
    for bucket, loss in expected[0]["val_loss_by_bucket"].items():
        assert validations[0]["val_loss_by_bucket"][bucket] == pytest.approx(loss, rel=1e-3)
    (layout,) = [r for r in read_metrics(split) if r.get("event") == "layout"]
    assert (layout["data_parallel"], layout["sequence_parallel"], layout["zero_stage"]) == (1, 2, 3)
    config = json.loads((split / "run_info.json").read_text())["config"]
    assert config["parallel"]["zero_stage"] == 3 and config["train"]["activation_checkpointing"] == "full"


def test_the_ranks_of_a_group_that_loaded_different_batches_stop(tmp_path):
    out = tmp_path / "report"
    assert_ok(run_torchrun(2, SCRIPTS / "group_batch_check.py", str(out)))
    reports = [json.loads(Path(f"{out}.{rank}.json").read_text()) for rank in (0, 1)]
    for rank, report in enumerate(reports):
        assert report["same"] == "same"
        for case in ("other_sample", "fewer"):  # every rank of the group stops, naming the other
            assert f"ranks [{1 - rank}] of this rank's group loaded another batch" in report[case], (
                rank,
                case,
            )
