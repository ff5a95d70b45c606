"""What a run reports: console lines, RUN_DIR/metrics.jsonl (every step), and wandb (rank 0 only)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from .config import TrainConfig

METRICS_FILE = "metrics.jsonl"


def keys_hash(keys: list[str]) -> str:
    """A short hash of a batch's sample keys in order, to compare two runs step by step."""
    return hashlib.sha1("\n".join(keys).encode()).hexdigest()[:12]


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All rows of a run's metrics.jsonl."""
    path = Path(run_dir) / METRICS_FILE
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )


def final_validation_loss(run_dir: str | Path) -> float | None:
    """The last validation loss a run logged (None when it has none)."""
    losses = [row["val_loss"] for row in read_metrics(run_dir) if row.get("event") == "validation"]
    return losses[-1] if losses and losses[-1] is not None else None


def wandb_mode(mode: str) -> str:
    """auto -> online when an API key is configured, offline otherwise."""
    if mode != "auto":
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def console_line(row: dict, max_steps: int) -> str:
    """One step row as a console line: loss, LR, gradient norm, throughput, MFU (when known), data wait,
    peak memory and time left."""
    if "mfu" in row:
        compute = f"MFU {100 * row['mfu']:.1f}%"
    else:  # no known peak (a CPU): achieved FLOP/s instead
        compute = f"{1000 * row['tflops_per_device']:.2f} GFLOP/s/device"
    return (
        f"step {row['step']}/{max_steps}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  grad {row['grad_norm']:.3f}  "
        f"{row['samples_per_s']:.1f} samples/s  {row['tokens_per_s_per_device']:,.0f} tokens/s/device  "
        f"{compute}  data wait {100 * row['data_wait']:.0f}%  peak mem {row['peak_memory_gb']:.1f} GiB  "
        f"eta {row['eta_s'] / 60:.1f} min"
    )


class MetricsLogger:
    """Rank 0's reporter. On resume, metrics.jsonl keeps only the rows up to the resumed step."""

    def __init__(self, cfg: TrainConfig, start_step: int, wandb_id: str | None):
        self.path = Path(cfg.run_dir) / METRICS_FILE
        self.log_every = cfg.train.log_every
        self.max_steps = cfg.train.max_steps
        self._truncate_after(start_step)
        self.file = self.path.open("a")
        self.started = time.monotonic()
        self.start_step = start_step
        self.wandb_run = None
        self.wandb_id = wandb_id
        mode = wandb_mode(cfg.wandb.mode)
        if mode != "disabled":
            import wandb

            self.wandb_run = wandb.init(
                project=cfg.wandb.project, entity=cfg.wandb.entity, dir=cfg.run_dir, id=wandb_id, resume="allow",
                mode=mode, config=asdict(cfg), settings=wandb.Settings(console="off", x_disable_stats=True),
            )  # fmt: skip
            self.wandb_run.define_metric("train/step")
            self.wandb_run.define_metric("*", step_metric="train/step")
            self.wandb_id = self.wandb_run.id

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [row for row in read_metrics(self.path.parent) if row.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))

    def log(self, row: dict) -> None:
        """Append a step row (it must hold "step"), with the estimated time left as `eta_s`; print a
        console line every `log_every` steps."""
        step = row["step"]
        elapsed = time.monotonic() - self.started
        row = {**row, "eta_s": elapsed / max(1, step - self.start_step) * (self.max_steps - step)}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(
                {
                    "train/step": step,
                    **{f"train/{k}": v for k, v in row.items() if k != "step" and isinstance(v, int | float)},
                }
            )
        if "loss" in row and (step % self.log_every == 0 or step == self.max_steps):
            print(console_line(row, self.max_steps), flush=True)

    def log_event(self, event: str, step: int, values: dict, echo: bool = True) -> None:
        """A non-step row (evaluation, samples); logged, and printed unless `echo` is False."""
        self.file.write(json.dumps({"event": event, "step": step, **values}) + "\n")
        self.file.flush()
        if echo:
            print(f"[{event}] step {step}: " + "  ".join(f"{k}={v}" for k, v in values.items()), flush=True)
        if self.wandb_run is not None:
            numeric = {f"{event}/{k}": v for k, v in values.items() if isinstance(v, int | float)}
            self.wandb_run.log({"train/step": step, **numeric})

    def log_videos(self, step: int, paths: list[Path], captions: list[str]) -> None:
        """Sample videos to wandb (files are already in the run dir)."""
        if self.wandb_run is None or not paths:
            return
        import wandb

        videos = [wandb.Video(str(p), caption=c, format="mp4") for p, c in zip(paths, captions, strict=True)]
        self.wandb_run.log({"train/step": step, "samples": videos})

    def close(self) -> None:
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
