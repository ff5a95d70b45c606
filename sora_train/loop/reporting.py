"""What the loop reports: rank 0's metrics row for every step (gathered from all ranks), a live
progress line when its console is a terminal, the start-of-run events and banner, and the data
totals at the end."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple, TextIO

from ..checkpoint.train_state import Resumed
from ..config import TrainConfig
from ..data.loader import VideoLoader, merge_counts
from ..data.recipe import tokens_per_sample
from ..guards import TrainingGuards
from ..hardware import device_peak_flops
from ..metrics import MetricsLogger, keys_hash
from ..models.vae import LatentSpace
from ..parallel.dist import DistInfo, all_gather_objects
from ..throughput import StepThroughput, banner_lines, peak_memory_bytes
from .step import StepOutcome


class RankReport(NamedTuple):
    """What each rank tells rank 0 after a step."""

    keys: list[str]
    tokens: int
    flops: float
    skips: dict[str, int]
    peak_memory: int  # bytes


class LiveProgress:
    """A live line for a terminal (tqdm): step, loss, clips/s, a bar and the ETA, redrawn each step.

    It shows only when `stream` is a terminal; elsewhere (SLURM logs, CI, captured output) it does
    nothing and the periodic lines of `train.log_every` are the console's record. While it shows on
    `sys.stdout`, the process' prints go through tqdm (`DummyTqdmFile`), which draws them above it.
    `close()` ends it (idempotent): at the last step, or when the loop stops early.
    """

    def __init__(self, max_steps: int, stream: TextIO | None = None):
        self.stream = stream if stream is not None else sys.stdout
        self.enabled = self.stream.isatty()
        self.max_steps = max_steps
        self.bar = None
        self.stdout: TextIO | None = None  # the sys.stdout replaced while the bar shows

    def update(self, step: int, loss: float, clips_per_s: float) -> None:
        """Show `step` done, with its loss and throughput; the bar starts at the first step shown."""
        if not self.enabled:
            return
        description = f"step {step}/{self.max_steps}  loss {loss:.4f}  {clips_per_s:.1f} clips/s"
        if self.bar is None:
            self.start(step, description)
        else:
            self.bar.set_description_str(description, refresh=False)
            self.bar.update(step - self.bar.n)
        if step >= self.max_steps:
            self.close()

    def start(self, step: int, description: str) -> None:
        """Draw the bar at `step` (its ETA counts from here) and route prints above it."""
        from tqdm import tqdm
        from tqdm.contrib import DummyTqdmFile

        self.bar = tqdm(
            total=self.max_steps, initial=step, desc=description, file=self.stream, dynamic_ncols=True,
            bar_format="{desc}  {bar}  ETA {remaining}", leave=True,
        )  # fmt: skip
        if self.stream is sys.stdout:
            self.stdout, sys.stdout = sys.stdout, DummyTqdmFile(sys.stdout)

    def close(self) -> None:
        """Leave the bar's last state on its line and give prints back their stream."""
        if self.stdout is not None:
            sys.stdout.flush()
            sys.stdout, self.stdout = self.stdout, None
        if self.bar is not None:
            self.bar.close()
        self.enabled = False


def data_reports(dist_info: DistInfo, value: object) -> list:
    """`value` from each data-parallel rank, in order (collective): the ranks of a sequence-parallel
    group hold the same samples, so only the first one of each group is counted."""
    gathered = all_gather_objects(value)
    return gathered[:: dist_info.sequence_parallel]


class StepReporter:
    """Gathers each step's figures from every rank (collective) and logs them on rank 0 (`logger`
    is None elsewhere): the metrics row with the engine's LR and gradient norm, sample keys when
    asked, and guard events; in a terminal rank 0 also shows a live progress line (`LiveProgress`,
    ended by `close()`)."""

    def __init__(
        self, logger: MetricsLogger | None, dist_info: DistInfo, engine, loader: VideoLoader,
        guards: TrainingGuards, log_keys: bool,
    ):  # fmt: skip
        self.logger, self.dist_info, self.engine = logger, dist_info, engine
        self.loader, self.guards, self.log_keys = loader, guards, log_keys
        self.peak_flops = device_peak_flops(dist_info.device)
        self.progress = LiveProgress(logger.max_steps) if logger is not None else None

    def log_step(self, step: int, outcome: StepOutcome) -> None:
        """The step's metrics row (collective: every rank's keys, tokens, FLOPs, skips and memory)."""
        local = (outcome.keys, outcome.tokens, outcome.flops, self.loader.skip_counts(),
                 peak_memory_bytes(self.dist_info.device))  # fmt: skip
        per_rank = [RankReport(*report) for report in all_gather_objects(local)]
        gathered = per_rank[:: self.dist_info.sequence_parallel]  # one report per data-parallel rank
        if self.logger is None:
            return
        keys = [key for report in gathered for key in report.keys]
        throughput = StepThroughput(
            tokens=sum(r.tokens for r in gathered), flops=sum(r.flops for r in gathered),
            seconds=outcome.seconds, devices=self.dist_info.world_size, peak_flops=self.peak_flops,
        )  # fmt: skip
        guards, elapsed, grad_norm = self.guards.state, outcome.seconds, self.engine.get_global_grad_norm()
        self.logger.log({
            "step": step, "loss": outcome.loss, "lr": self.engine.get_lr()[0], "grad_norm": float(grad_norm or 0.0),
            "epoch": outcome.epoch,
            "samples_per_s": len(keys) / elapsed, "tokens_per_s": throughput.tokens / elapsed,
            **throughput.row(), "data_wait": outcome.data_wait,
            "peak_memory_gb": max(r.peak_memory for r in per_rank) / 2**30, "batch_hash": keys_hash(keys),
            "skipped": sum(merge_counts([r.skips for r in gathered]).values()),
            "skipped_steps": guards.skipped_steps, "loss_spikes": guards.loss_spikes,
        })  # fmt: skip
        if self.progress is not None:
            self.progress.update(step, outcome.loss, len(keys) / elapsed)
        if self.log_keys:
            self.logger.log_event("keys", step, {"keys": keys})
        if outcome.verdict.skipped or outcome.verdict.spike:
            kind = "nonfinite_step_skipped" if outcome.verdict.skipped else "loss_spike"
            self.logger.log_event(kind, step, {"loss": outcome.loss, **self.guards.state_dict()})

    def close(self) -> None:
        """End the live progress line, if any (the loop has stopped)."""
        if self.progress is not None:
            self.progress.close()

    def log_data_totals(self, step: int) -> None:
        """Skipped samples by reason over all data-parallel ranks, and rejected ones (collective)."""
        skipped = merge_counts(data_reports(self.dist_info, self.loader.skip_counts()))
        if self.logger:
            self.logger.log_event(
                "data",
                step,
                {"skipped_by_reason": skipped, "rejected_by_reason": dict(+self.loader.rejected)},
            )


def tokens_per_step(
    cfg: TrainConfig, loader: VideoLoader, latent_space: LatentSpace, data_world: int, accumulation: int
) -> dict[str, int]:
    """Tokens one optimizer step trains on, for a step of each bucket: per-rank batch × tokens per sample
    × data-parallel ranks × accumulation."""
    patch = tuple(cfg.model.patch_size)
    settings = loader.settings
    return {
        bucket.name: size * tokens_per_sample(bucket, latent_space, patch) * data_world * accumulation
        for bucket, size in zip(settings.table.buckets, settings.batch_sizes, strict=True)
    }


def report_start(
    logger: MetricsLogger, checkpoint: Path | None, resumed: Resumed, loader: VideoLoader, layout: dict
) -> None:
    """Console lines and metrics events for how this run starts: resumed checkpoint, what was
    passed over, changed settings, the data index, and the run's layout (`layout_summary`)."""
    for problem in resumed.passed_over:
        print(f"checkpoint passed over: {problem}", flush=True)
    if resumed.passed_over:
        logger.log_event("checkpoints_passed_over", resumed.step, {"problems": resumed.passed_over})
    if resumed.set_aside:
        print(
            f"checkpoints newer than step {resumed.step}, from the branch this run left, taken out of it "
            f"(checkpoint.abandoned: moved to checkpoints/abandoned-*/ or deleted): {', '.join(resumed.set_aside)}",
            flush=True,
        )
        logger.log_event("checkpoints_set_aside", resumed.step, {"checkpoints": resumed.set_aside})
    if checkpoint is not None:
        print(f"resumed from {checkpoint} at step {resumed.step}", flush=True)
        for key, old, new in resumed.config_changes:
            print(f"warning: {key} changed since the checkpoint: {old!r} -> {new!r}", flush=True)
        logger.log_event("resumed", resumed.step, {
            "checkpoint": str(checkpoint), "config_changes": {k: [o, n] for k, o, n in resumed.config_changes},
        })  # fmt: skip
    logger.log_event("data_index", resumed.step, {
        "rejected_by_reason": dict(+loader.rejected), "samples_by_bucket": dict(loader.bucket_counts),
        "batch_size_by_bucket": {b.name: size for b, size in zip(
            loader.settings.table.buckets, loader.settings.batch_sizes, strict=True)},
    })  # fmt: skip
    print("\n".join(banner_lines(layout)), flush=True)
    logger.log_event("layout", resumed.step, layout, echo=False)
