"""Step time of `sora-train` against a plain DeepSpeed loop of the same model, engine and data.

Both sides run on 2 processes started by `torchrun --standalone` (gloo on CPU), with one config
composed by Hydra's compose API from the shipped recipes (`sora_train.recipes.config_dir()`) and
the same overrides, so model, data, batch and DeepSpeed settings are identical:

* **A, sora-train**: the trainer's own entry point (`sora_train.cli.main`, what
  `python -m sora_train.cli` runs) under torchrun, for `--steps` steps on a synthetic corpus,
  with no periodic checkpoint, validation, sampling or evaluation. Its step time is what it logs:
  each metrics.jsonl row has `samples_per_s` over the global batch, so a step took
  `global_batch_size / samples_per_s` seconds, measured by the trainer from the start of fetching
  the batch to after `engine.step()` and the EMA update.
* **B, plain loop**: this script as a torchrun child (`--child plain`). It builds what the trainer
  builds (`build_denoiser`, sequence parallelism and activation checkpointing as configured,
  `training_engine`, `build_latent_space`, `build_loader`, `PromptEncoder`, the same seeds, data ranks
  and torch threads) and runs the bare loop: `dist.barrier()`, clock, next batch,
  the trainer's `forward_backward` (inputs, flow-matching loss, `engine.backward`), `engine.step()`,
  clock. No metrics, guards, EMA, key gathering or checkpoints.

Besides the step time, each side's period (step to step: everything the loop does; for A, between
rank 0's metrics rows, so it adds the trainer's work after its own clock stops: the loss all-reduce,
the guards, the all-gather of sample keys and counts, the throughput figures, the metrics row, the
preemption check; for B, barrier to barrier) and the CPU seconds of rank 0's process in the period
(`time.process_time`, all its threads, not its decode worker; counts less of what else runs on the
machine than wall times do). The trainer's code runs unchanged; on rank 0 the bench wraps the
functions it calls (`forward_backward`, `engine.step`, `EMA.update`, the collectives,
`TrainingGuards.observe`, `MetricsLogger.log`) with a clock, which costs microseconds per call, and
B's shared calls the same way, so a breakdown shows where each side's step goes and how much of A's
is its own work.

Runs alternate A, B, A, B, ... (`--repeats` each). Per run, the median over the steps after the
first `--warmup` (start-up, the first batches and the end of training are not counted); over the
runs, the median of the per-run medians, and each ratio is the median of the paired ratios A / B.
Target: A / B <= 1.10 for the step time. The corpus (256 synthetic clips) is written before the
first run, not timed. Wall times on a shared machine count what else runs on it; the hypervisor's
share ("steal") and the 1-minute load average at the end of each run (the bench's own 2 processes
make about 2) are printed.

    python bench/trainer_overhead.py [--steps 25] [--warmup 5] [--repeats 5] [--global-batch 16]
        [--workdir DIR] [--keep] [--json] [OVERRIDE ...]

OVERRIDEs are extra Hydra overrides for both sides, e.g. `parallel=zero3` or `model.depth=8`.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NPROC = 2
TARGET = 1.10
CLIPS = 256  # synthetic training clips, 32 per shard; epochs repeat when a run needs more
STEP_TIMES = "bench_steps.json"  # rank 0's per-step clocks, written into each run dir
SAMPLE_PROMPT = "a red square moving right on a black background"

# Parts of a step, as labelled by the clocks. Shared: both sides call them.
FORWARD_BACKWARD, ENGINE_STEP = "forward + backward (`forward_backward`)", "`engine.step()`"
EMA_UPDATE = "EMA update"
AFTER_CLOCK = {  # the trainer's calls after its step clock stops: (module, function) -> label
    ("sora_train.loop.step", "all_reduce_mean"): "loss and data-wait all-reduce",
    ("sora_train.loop.reporting", "all_gather_objects"): "all-gather of keys and counts",
    ("sora_train.loop.checkpointer", "any_rank"): "preemption check (all-reduce)",
}
GUARDS, METRICS_ROW = "health guards", "metrics row (json + flush)"


@dataclass(frozen=True)
class StepTimes:
    """One step on rank 0: wall seconds of the timed part and of the whole period, CPU seconds of the
    process in the period, and wall seconds in each clocked part."""

    step: float
    period: float
    cpu: float
    parts: dict[str, float]


@dataclass(frozen=True)
class SideRun:
    """One run of one side: its steps after the warm-up."""

    steps: list[StepTimes]

    def median(self, figure: Callable[[StepTimes], float]) -> float:
        """Median over the steps of `figure`."""
        return statistics.median(figure(step) for step in self.steps)

    @property
    def step(self) -> float:
        """Median seconds of the timed part of a step."""
        return self.median(lambda s: s.step)

    @property
    def period(self) -> float:
        """Median seconds from one step to the next."""
        return self.median(lambda s: s.period)

    @property
    def cpu(self) -> float:
        """Median CPU seconds of rank 0's process from one step to the next."""
        return self.median(lambda s: s.cpu)


class PartClock:
    """Wall seconds spent in wrapped functions since the last `take()` (the wrapped calls do not nest)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, owner: Any, name: str, label: str) -> None:
        """From now on, time every call of `owner.name` under `label`."""
        function = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start

        setattr(owner, name, timed)

    def take(self) -> dict[str, float]:
        """The seconds per label so far; starts over."""
        parts = dict(self.seconds)
        self.seconds.clear()
        return parts


# ---------------------------------------------------------------------------------------------
# Configuration, the same for both sides


def run_overrides(corpus: Path, steps: int, global_batch: int, extra: list[str]) -> list[str]:
    """Hydra overrides for a run of `steps` steps on `corpus`, with nothing periodic and a short end."""
    return [
        f"data.train={corpus / 'train'}", "data.val=null", f"train.max_steps={steps}",
        f"train.global_batch_size={global_batch}", "checkpoint.every=0", "checkpoint.save_final=false",
        "eval.validate=false", "eval.synthetic=false", "train.sample_every=0", "wandb.mode=disabled",
        f"train.log_every={steps}", "diffusion.sample_steps=1", f"train.sample_prompts=[{SAMPLE_PROMPT}]",
        *extra,
    ]  # fmt: skip


def compose_config(overrides: list[str], world_size: int = NPROC):  # -> TrainConfig (imported lazily)
    """The `TrainConfig` of configs/train.yaml with `overrides`, composed by Hydra, validated for
    `world_size` processes."""
    from hydra import compose, initialize_config_dir

    from sora_train.config import register_schema, to_train_config, validate
    from sora_train.recipes import config_dir

    register_schema()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = to_train_config(compose("train", overrides=overrides))
    validate(cfg, world_size)
    return cfg


# ---------------------------------------------------------------------------------------------
# The torchrun children


def trainer_child(overrides: list[str]) -> None:
    """Side A: sora-train's entry point, unchanged, its calls clocked; at each metrics row rank 0 notes
    the wall and CPU clocks and the parts since the previous row, and writes them all at the end."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    from sora_train import cli
    from sora_train.ema import EMA
    from sora_train.guards import TrainingGuards
    from sora_train.loop import step
    from sora_train.metrics import MetricsLogger

    clock = PartClock()
    clock.wrap(step, "forward_backward", FORWARD_BACKWARD)
    clock.wrap(DeepSpeedEngine, "step", ENGINE_STEP)
    clock.wrap(EMA, "update", EMA_UPDATE)
    for (module, name), label in AFTER_CLOCK.items():
        clock.wrap(importlib.import_module(module), name, label)
    clock.wrap(TrainingGuards, "observe", GUARDS)
    clock.wrap(MetricsLogger, "log", METRICS_ROW)  # only rank 0 has a logger: the clocks are rank 0's
    marks: list[dict] = []
    log, close = MetricsLogger.log, MetricsLogger.close

    def marked_log(self: MetricsLogger, row: dict) -> None:
        log(self, row)
        if "loss" in row:  # a step row, not an event
            marks.append({"step": row["step"], "wall": time.perf_counter(), "cpu": time.process_time(),
                          "parts": clock.take()})  # fmt: skip

    def marked_close(self: MetricsLogger) -> None:
        close(self)
        (self.path.parent / STEP_TIMES).write_text(json.dumps(marks))

    MetricsLogger.log, MetricsLogger.close = marked_log, marked_close
    sys.argv = [sys.argv[0], *overrides]
    cli.main()


def plain_child(overrides: list[str]) -> None:
    """Side B: the trainer's components in a bare loop; rank 0 writes its step times to the run dir."""
    import torch
    from deepspeed.runtime.engine import DeepSpeedEngine

    from sora_train.data.recipe import build_loader
    from sora_train.loop import step
    from sora_train.loop.engine import batch_layout, training_engine
    from sora_train.models.denoiser import build_denoiser
    from sora_train.models.prompts import PromptEncoder
    from sora_train.models.vae import build_latent_space
    from sora_train.parallel.checkpointing import apply_activation_checkpointing
    from sora_train.parallel.compile import apply_block_compile
    from sora_train.parallel.dist import barrier, init_distributed, shutdown_distributed
    from sora_train.parallel.sequence import apply_sequence_parallel
    from sora_train.parallel.zero import use_bf16

    cfg = compose_config(overrides, int(os.environ["WORLD_SIZE"]))  # set by torchrun
    info = init_distributed(cfg.parallel.sequence_parallel)
    device = info.device
    torch.set_num_threads(
        cfg.train.threads_per_rank or max(1, (os.cpu_count() or 1) // info.local_world_size)
    )
    torch.manual_seed(cfg.seed)
    model = build_denoiser(cfg.model)
    apply_sequence_parallel(model, info.sequence_group)
    apply_activation_checkpointing(
        model, cfg.train.activation_checkpointing, cfg.train.activation_checkpointing_every
    )
    if cfg.train.compile_blocks:  # compiles __call__, so the checkpoint is in the graph (compile.py: order)
        apply_block_compile(model)
    layout = batch_layout(cfg, info.data_world)
    engine = training_engine(model, cfg, layout)
    dtype = torch.bfloat16 if use_bf16(cfg.train.precision) else torch.float32
    latent_space = build_latent_space(cfg.model.latent_space, cfg.model.vae_path, device)
    encoder = None if cfg.data.precomputed else latent_space
    loader = build_loader(cfg, info.data_rank, info.data_world, latent_space, layout.micro_batch)
    prompts = PromptEncoder(cfg.model, device)
    batches = iter(loader)
    clock = PartClock()
    clock.wrap(step, "forward_backward", FORWARD_BACKWARD)
    clock.wrap(DeepSpeedEngine, "step", ENGINE_STEP)

    walls, cpus, steps, parts = [], [], [], []
    for number in range(1, cfg.train.max_steps + 1):
        barrier()
        started = time.perf_counter()
        walls.append(started)
        cpus.append(time.process_time())
        for _ in range(cfg.train.grad_accum_steps):
            batch = next(batches)
            step.forward_backward(engine, batch, prompts, encoder, number, cfg, dtype)
            engine.step()
        steps.append(time.perf_counter() - started)
        parts.append(clock.take())
    barrier()
    walls.append(time.perf_counter())
    cpus.append(time.process_time())
    batches.close()
    if info.is_main:
        columns = zip(steps, differences(walls), differences(cpus), parts, strict=True)
        times = [{"step": s, "period": p, "cpu": c, "parts": q} for s, p, c, q in columns]
        (Path(cfg.run_dir) / STEP_TIMES).write_text(json.dumps(times))
    shutdown_distributed()


def differences(marks: list[float]) -> list[float]:
    """What passed between consecutive marks."""
    return [b - a for a, b in itertools.pairwise(marks)]


# ---------------------------------------------------------------------------------------------
# The parent: alternate the sides, read their step times


def launch(child: str, overrides: list[str], run_dir: Path, env: dict[str, str]) -> None:
    """Run this script as a 2-process torchrun job in role `child`; its output goes to RUN_DIR.log."""
    run_dir.mkdir(parents=True)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={NPROC}",
        str(Path(__file__).resolve()), "--child", child, *overrides, f"run_dir={run_dir}",
    ]  # fmt: skip
    log = run_dir.with_suffix(".log")
    with log.open("w") as out:
        env = {**env, "SORA_RUN_DIR": str(run_dir)}
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=900).returncode
    if code:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"the {child} run exited {code}; the end of {log}:\n{tail}")


def trainer_run(run_dir: Path, global_batch: int, warmup: int) -> SideRun:
    """Side A's steps: the step time from metrics.jsonl (global batch / samples_per_s), the rest from
    the marks at its rows."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step_s = {row["step"]: global_batch / row["samples_per_s"] for row in rows if "samples_per_s" in row}
    marks = {mark["step"]: mark for mark in json.loads((run_dir / STEP_TIMES).read_text())}
    return SideRun([
        StepTimes(step_s[s], marks[s]["wall"] - marks[s - 1]["wall"], marks[s]["cpu"] - marks[s - 1]["cpu"],
                  marks[s]["parts"])
        for s in sorted(step_s)[warmup:]
    ])  # fmt: skip


def plain_run(run_dir: Path, warmup: int) -> SideRun:
    """Side B's steps as rank 0 wrote them."""
    return SideRun([StepTimes(**times) for times in json.loads((run_dir / STEP_TIMES).read_text())[warmup:]])


def environment() -> str:
    """One line: the machine and the library versions."""
    import deepspeed
    import machine  # bench/machine.py: the script's own directory is on sys.path
    import torch

    return machine.environment(f"torch {torch.__version__}, deepspeed {deepspeed.__version__}")


# ---------------------------------------------------------------------------------------------
# Report

FIGURES = {  # SideRun property: its row in the table
    "step": "step time, wall (fetch → optimizer step, as the trainer times it)",
    "period": "period, wall (step to step: the whole loop)",
    "cpu": "period, CPU of rank 0's process",
}


def own_work(step: StepTimes) -> float:
    """Seconds of a sora-train step in what the plain loop does not do: the EMA update and all the loop
    does after the trainer's clock stops (which includes waiting for the other rank, as B's barrier does)."""
    return step.parts.get(EMA_UPDATE, 0.0) + step.period - step.step


def breakdown(runs: list[SideRun], trainer: bool) -> list[tuple[str, float]]:
    """(part, seconds) rows: the median over the runs of each run's median per step."""

    def row(figure: Callable[[StepTimes], float]) -> float:
        return statistics.median(run.median(figure) for run in runs)

    def part(label: str) -> Callable[[StepTimes], float]:
        return lambda s: s.parts.get(label, 0.0)

    timed = [FORWARD_BACKWARD, ENGINE_STEP, *([EMA_UPDATE] if trainer else [])]
    after = [*AFTER_CLOCK.values(), GUARDS, METRICS_ROW] if trainer else []
    rest_of_step = (
        "rest: fetch the batch; keys, token and FLOP counts" if trainer else "rest: fetch the batch"
    )
    rest_of_period = (
        "rest of the loop (throughput figures, peak memory)" if trainer else "barrier, rest of the loop"
    )
    return [
        *[(label, row(part(label))) for label in timed],
        (rest_of_step, row(lambda s: s.step - sum(s.parts.get(label, 0.0) for label in timed))),
        ("**step time**", row(lambda s: s.step)),
        *[(label, row(part(label))) for label in after],
        (rest_of_period, row(lambda s: s.period - s.step - sum(s.parts.get(label, 0.0) for label in after))),
        ("**period**", row(lambda s: s.period)),
    ]


def print_results(a: list[SideRun], b: list[SideRun], loads: list[float], steps: int) -> dict:
    """Per-repeat lines and the Markdown tables; returns the figures."""
    print("\n| repeat | A step s | B step s | A/B | A period s | B period s | A/B | A CPU s | B CPU s | A/B "
          "| load (1 min) after A, B |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        cells = [
            f"{getattr(x, f):.3f} | {getattr(y, f):.3f} | {getattr(x, f) / getattr(y, f):.3f}"
            for f in FIGURES
        ]
        print(f"| {i + 1} | {' | '.join(cells)} | {loads[2 * i]:.1f}, {loads[2 * i + 1]:.1f} |")
    figures: dict[str, Any] = {
        figure: {
            "sora_train_s": statistics.median(getattr(x, figure) for x in a),
            "plain_s": statistics.median(getattr(y, figure) for y in b),
            "ratio": statistics.median(
                getattr(x, figure) / getattr(y, figure) for x, y in zip(a, b, strict=True)
            ),
        }
        for figure in FIGURES
    }
    met = figures["step"]["ratio"] <= TARGET
    print(f"\nmedians over {len(a)} runs per side, each the median of its last {steps} steps")
    print("\n| figure | sora-train s | plain loop s | ratio | target | verdict |")
    print("|---|---|---|---|---|---|")
    for figure, label in FIGURES.items():
        values = figures[figure]
        target, verdict = (
            (f"≤ {TARGET:.2f}", "met" if met else "**missed**") if figure == "step" else ("–", "–")
        )
        print(
            f"| {label} | {values['sora_train_s']:.3f} | {values['plain_s']:.3f} | **{values['ratio']:.3f}** "
            f"| {target} | {verdict} |"
        )
    for title, runs, trainer in (("sora-train", a, True), ("plain loop", b, False)):
        print(f"\n| {title}: part of a step (rank 0) | median s |")
        print("|---|---|")
        for label, seconds in breakdown(runs, trainer):
            print(f"| {label} | {seconds:.4f} |")
    own = statistics.median(run.median(own_work) for run in a)
    share = statistics.median(run.median(lambda s: own_work(s) / s.period) for run in a)
    print(f"\nsora-train's own work per step (EMA update and everything after its clock): {1000 * own:.1f} ms, "
          f"{100 * share:.1f} % of its period")  # fmt: skip
    return {**figures, "target": TARGET, "met": met, "own_work_s": own, "own_work_share": share,
            "breakdown": {"sora_train": breakdown(a, True), "plain": breakdown(b, False)}}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--steps", type=int, default=25, help="training steps per run (default 25)")
    add("--warmup", type=int, default=5, help="first steps of each run not counted (default 5)")
    add("--repeats", type=int, default=5, help="runs of each side, alternating; median (default 5)")
    add("--global-batch", type=int, default=16, help="samples per step over both processes (default 16)")
    add("--workdir", type=Path, default=None, help="where the corpus and run dirs go (default: temp)")
    add("--keep", action="store_true", help="keep the work folder")
    add("--json", action="store_true", help="also print the figures as one JSON line")
    add("--child", choices=("trainer", "plain"), help=argparse.SUPPRESS)  # set by the bench for its children
    add("overrides", nargs="*", help="extra Hydra overrides for both sides")
    args = parser.parse_args(argv)
    if args.child is None and (args.repeats < 1 or args.warmup < 1 or args.steps <= args.warmup + 2):
        parser.error("need --repeats >= 1, --warmup >= 1 and --steps > --warmup + 2")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child == "trainer":
        return trainer_child(args.overrides)
    if args.child == "plain":
        return plain_child(args.overrides)

    import machine  # bench/machine.py and bench/scratch.py: the script's own directory is on sys.path
    from scratch import scratch_dir

    from sora_train.data.synthetic import generate_corpus

    names = ["corpus", "cache", *(f"{side}_{i}{suffix}" for side in ("trainer", "plain")
             for i in range(1, args.repeats + 1) for suffix in ("", ".log"))]  # fmt: skip
    with scratch_dir(args.workdir, args.keep, "trainer_overhead_", names) as root:
        print(environment())
        generate_corpus(root / "corpus", num_train=CLIPS, num_val=0, samples_per_shard=32)
        overrides = run_overrides(root / "corpus", args.steps, args.global_batch, args.overrides)
        cfg = compose_config([*overrides, f"run_dir={root}"])  # fails early on a bad override
        print(
            f"model {cfg.model.preset} (hidden {cfg.model.hidden_size}, depth {cfg.model.depth}), clips "
            f"{cfg.data.num_frames}x{cfg.data.height}x{cfg.data.width}, global batch {cfg.train.global_batch_size}, "
            f"ZeRO-{cfg.parallel.zero_stage}, {NPROC} processes; {args.steps} steps per run, "
            f"the first {args.warmup} not counted"
        )
        env = {**os.environ, "SORA_CACHE_DIR": str(root / "cache"), "PYTHONUNBUFFERED": "1"}
        a: list[SideRun] = []
        b: list[SideRun] = []
        loads: list[float] = []  # the 1-minute load average at the end of each run
        steal, total = machine.steal_jiffies()
        for i in range(1, args.repeats + 1):
            launch("trainer", overrides, root / f"trainer_{i}", env)
            loads.append(os.getloadavg()[0])
            a.append(trainer_run(root / f"trainer_{i}", cfg.train.global_batch_size, args.warmup))
            launch("plain", overrides, root / f"plain_{i}", env)
            loads.append(os.getloadavg()[0])
            b.append(plain_run(root / f"plain_{i}", args.warmup))
            print(f"repeat {i}: sora-train {a[-1].step:.3f} s, plain {b[-1].step:.3f} s", flush=True)
        steal, total = (x - y for x, y in zip(machine.steal_jiffies(), (steal, total), strict=True))
        figures = print_results(a, b, loads, args.steps - args.warmup)
        print(
            f"\nsteal {100 * steal / max(1, total):.0f} %, median 1-minute load {statistics.median(loads):.1f}"
        )
        if args.json:
            print(json.dumps({**figures, "steal": steal / max(1, total), "loads": loads, "repeats": args.repeats,
                              "steps": args.steps, "warmup": args.warmup}))  # fmt: skip


if __name__ == "__main__":
    main()
