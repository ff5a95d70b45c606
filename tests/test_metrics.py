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
