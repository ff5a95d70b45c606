"""sora-train: compose the config with Hydra, validate it, and train here or under torchrun.

`sora-train [overrides]` composes configs/train.yaml, validates it, and then either trains in this
process, or (with launch.nproc_per_node > 1 outside torchrun, or for each job of a sweep) starts
that many local processes with torchrun, all sharing one run dir computed here. Exit codes: 0 done,
2 a bad configuration, data or checkpoint, 3 training diverged, 1 a failed save or a crash, 75 stopped
by a preemption signal after checkpointing (requeue and run again).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from .checkpoint import CheckpointInvalid, CheckpointSaveFailed
from .checkpoint.safe_load import UnsafeCheckpoint
from .compose import compose_config
from .config import ConfigError, TrainConfig, register_schema, to_train_config, validate
from .data.storage import ShardError
from .guards import TrainingDiverged
from .launcher import RELAYED_SIGNALS, hold_and_relay_signals
from .metrics import final_validation_loss
from .parallel.dist import WaitForMainFailed, leave_process
from .parallel.replicas import ReplicasDiverged
from .parallel.sequence import GroupBatchesDiffer
from .preemption import EXIT_PREEMPTED, was_preempted
from .recipes import config_dir

EXIT_CODES: tuple[tuple[tuple[type[BaseException], ...], int], ...] = (
    ((ConfigError, ShardError, CheckpointInvalid, UnsafeCheckpoint), 2),  # fix the input and run again
    ((TrainingDiverged, ReplicasDiverged), 3),  # the run itself went wrong
    ((CheckpointSaveFailed, GroupBatchesDiffer, WaitForMainFailed), 1),  # a rerun resumes
)
KNOWN_ERRORS = tuple(kind for kinds, _ in EXIT_CODES for kind in kinds)


def exit_code(error: BaseException) -> int:
    """The exit code for one of the errors `sora-train` reports as one line."""
    return next(code for kinds, code in EXIT_CODES if isinstance(error, kinds))


def job_config(dict_cfg: DictConfig) -> TrainConfig:
    """This job's TrainConfig; in a multirun sweep each job gets its own run dir unless run_dir was given."""
    hydra_cfg = HydraConfig.get()
    cfg = to_train_config(dict_cfg)
    if hydra_cfg.mode == RunMode.MULTIRUN and not any(
        o.startswith("run_dir=") for o in hydra_cfg.overrides.task
    ):
        cfg.run_dir = hydra_cfg.runtime.output_dir
    cfg.run_dir = str(Path(cfg.run_dir).resolve())
    return cfg


def launch_local(cfg: TrainConfig) -> int:
    """Start launch.nproc_per_node processes with torchrun on this machine (`sora_train.launcher`,
    which relays the preemption signals, as this process does from now on with those nothing else
    here handles: a SLURM sweep job's own handlers stay); returns their exit code
    (EXIT_PREEMPTED when they stopped on a preemption signal, which torchrun reports as 1)."""
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("run_dir=")]
    command = [
        sys.executable, "-m", "sora_train.launcher", "--standalone", f"--nproc-per-node={cfg.launch.nproc_per_node}",
        "-m", "sora_train.cli", *overrides, f"run_dir={cfg.run_dir}",
    ]  # fmt: skip
    print(f"run dir {cfg.run_dir}: starting {cfg.launch.nproc_per_node} processes", flush=True)
    hold_and_relay_signals(tuple(s for s in RELAYED_SIGNALS if signal.getsignal(s) == signal.SIG_DFL))
    started = time.time()
    code = subprocess.run(command, env={**os.environ, "SORA_RUN_DIR": cfg.run_dir}).returncode
    return EXIT_PREEMPTED if code and was_preempted(cfg.run_dir, started) else code


def run_job(cfg: TrainConfig) -> int:
    """Train this job here, or under torchrun when it needs several processes or is one job of a
    sweep (each job then gets fresh processes: DeepSpeed keeps process-wide state a second run cannot
    reuse). Returns the exit code."""
    from .train import train

    in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    if "LOCAL_RANK" not in os.environ and (cfg.launch.nproc_per_node > 1 or in_sweep):
        return launch_local(cfg)
    return 0 if train(cfg) else EXIT_PREEMPTED


@hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
def _hydra_main(dict_cfg: DictConfig) -> float | None:
    """Train one job; returns its final validation loss (what a hyperparameter search minimises)."""
    cfg = job_config(dict_cfg)
    try:
        validate(cfg)
        code = run_job(cfg)
    except KNOWN_ERRORS as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        code = exit_code(error)
    if code:
        sys.exit(code)
    return final_validation_loss(cfg.run_dir)


def precheck_overrides(overrides: list[str]) -> str | None:
    """Compose the config once with the command-line overrides; a one-line message if that fails."""
    plain = [o for o in overrides if not o.startswith(("-", "hydra.", "hydra/", "+hydra", "~hydra"))]
    try:
        compose_config(plain)
    except ConfigError as error:
        return str(error)
    return None


def status_of(stop: SystemExit) -> int:
    """The exit status `sys.exit` would give for `stop` (a message is printed to stderr, status 1)."""
    if stop.code is None or isinstance(stop.code, int):
        return stop.code or 0
    print(stop.code, file=sys.stderr)
    return 1


def finish_wandb(code: int) -> None:
    """Close a wandb run an error left open, with the exit status (its exit hook will not run)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.run.finish(exit_code=code)


def main() -> None:
    """Entry point of `sora-train`."""
    register_schema()
    args = sys.argv[1:]
    if not any(a in ("-m", "--multirun") or a.startswith("--") for a in args):
        problem = precheck_overrides(args)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            sys.exit(2)
    try:
        _hydra_main()
        code = 0
    except SystemExit as stop:
        code = status_of(stop)
    finish_wandb(code)
    leave_process(code)


if __name__ == "__main__":
    main()
