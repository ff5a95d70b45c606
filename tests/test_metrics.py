"""metrics.jsonl and wandb across a resume."""

from __future__ import annotations

from sora_train.config import TrainConfig
from sora_train.metrics import MetricsLogger, keys_hash, read_metrics


def row(step: int) -> dict:
    return {"step": step, "loss": 1.0 / step, "lr": 1e-3, "grad_norm": 0.5, "samples_per_s": 10.0,
            "tokens_per_s": 100.0, "data_wait": 0.0, "batch_hash": keys_hash([str(step)]), "skipped": 0}  # fmt: skip


def test_resume_truncates_metrics_and_keeps_the_wandb_run(tmp_path):
    cfg = TrainConfig(run_dir=str(tmp_path))
    cfg.wandb.mode = "offline"
    first = MetricsLogger(cfg, start_step=0, wandb_id=None)
    for step in (1, 2, 3, 4):
        first.log(row(step))
    run_id = first.wandb_id
    first.close()
    assert run_id and any(run_id in p.name for p in (tmp_path / "wandb").iterdir())

    resumed = MetricsLogger(cfg, start_step=2, wandb_id=run_id)  # as after loading the step-2 checkpoint
    assert resumed.wandb_id == run_id
    resumed.log(row(3))
    resumed.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_keys_hash_is_order_sensitive():
    assert keys_hash(["a", "b"]) != keys_hash(["b", "a"])
    assert keys_hash(["a", "b"]) == keys_hash(["a", "b"]) and len(keys_hash(["a"])) == 12


def test_step_throughput_reports_mfu_against_the_device_peak():
    from sora_train.throughput import StepThroughput

    step = StepThroughput(tokens=1000, flops=2e12, seconds=2.0, devices=2, peak_flops=1e12)
    assert step.row() == {"tokens_per_s_per_device": 250.0, "tflops_per_device": 0.5, "mfu": 0.5}
    assert "mfu" not in StepThroughput(1000, 2e12, 2.0, 2, peak_flops=None).row()  # a CPU: no peak


def test_banner_names_the_world_layout_and_tokens_per_step():
    from sora_train.throughput import banner_lines

    summary = {
        "nodes": 4, "devices_per_node": 8, "device": "cuda", "data_parallel": 8, "sequence_parallel": 4,
        "zero_stage": 3, "parameters": 1_234_567, "global_batch": 16,
        "tokens_per_step_by_bucket": {"a": 1000, "b": 2000},
    }  # fmt: skip
    assert banner_lines(summary) == [
        "world: 4 node(s) × 8 cuda device(s) = data-parallel 8 × sequence-parallel 4, ZeRO stage 3",
        "model: 1,234,567 parameters; global batch 16 samples, 1,000 to 2,000 (by bucket) tokens per step",
    ]
