"""sora-train with one fault injected, for the recovery tests (runs alone or under torchrun).

python faulty_train.py nan RANK STEPS [overrides]    RANK's loss is NaN at STEPS (comma-separated)
python faulty_train.py crash_in_save STEP [overrides] SIGKILL this process halfway through the save
                                                     at STEP: every file written, none checksummed
python faulty_train.py desync RANK STEP [overrides]  change one weight on RANK after the update of STEP
python faulty_train.py signal_at_start RANK [overrides]  SIGUSR1 to RANK while it picks the checkpoint
                                                     to resume from (start-up, before the model exists)
python faulty_train.py lagging_listing [overrides]   each rank's listing of a staging directory misses
                                                     the files the other ranks wrote (a network
                                                     filesystem's attribute cache)
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def inject_nan(rank: int, steps: set[int]) -> None:
    """Multiply the loss by NaN on `rank` at `steps` (one micro-batch per step), so the gradients are NaN."""
    import sora_train.loop.step as step

    real_loss, calls = step.flow_loss, [0]

    def flow_loss(*args, **kwargs):
        calls[0] += 1
        loss = real_loss(*args, **kwargs)
        hit = int(os.environ.get("RANK", 0)) == rank and calls[0] in steps
        return loss * float("nan") if hit else loss

    step.flow_loss = flow_loss


def crash_in_save(step: int) -> None:
    """Kill the process when the save at `step` starts checksumming its staged files."""
    import sora_train.checkpoint.saving as saving
    from sora_train.checkpoint.store import tag_for

    real_describe = saving.describe_files

    def describe_files(directory: Path, names: list[str]):
        if directory.name.endswith(tag_for(step)):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_describe(directory, names)

    saving.describe_files = describe_files


def desync(rank: int, step: int) -> None:
    """Add 1e-3 to the first weight of `rank`'s model right after the optimizer step `step`."""
    from sora_train.ema import EMA

    real_update, calls = EMA.update, [0]

    def update(self, model):
        calls[0] += 1
        if int(os.environ.get("RANK", 0)) == rank and calls[0] == step:
            next(model.parameters()).data.add_(1e-3)
        return real_update(self, model)

    EMA.update = update


def lagging_listing() -> None:
    """Hide from each rank's listings the files whose names carry another rank's number."""
    import sora_train.checkpoint.saving as saving

    real_list, rank, world = saving.list_files, int(os.environ.get("RANK", 0)), int(os.environ["WORLD_SIZE"])
    others = [r for r in range(world) if r != rank]

    def list_files(directory: Path) -> list[str]:
        hidden = [f"rank_{r}_" for r in others] + [f"rank_{r:05d}" for r in others]
        return [name for name in real_list(directory) if not any(mark in name for mark in hidden)]

    saving.list_files = list_files


def signal_at_start(rank: int) -> None:
    """Send SIGUSR1 to this process, on `rank`, as start-up begins choosing its checkpoint."""
    import sora_train.train as train

    real_prepare = train.prepare_resume

    def prepare_resume(cfg, dist_info):
        if dist_info.rank == rank:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_prepare(cfg, dist_info)

    train.prepare_resume = prepare_resume


def main() -> None:
    fault, *rest = sys.argv[1:]
    if fault == "nan":
        rank, steps, *overrides = rest
        inject_nan(int(rank), {int(s) for s in steps.split(",")})
    elif fault == "crash_in_save":
        step, *overrides = rest
        crash_in_save(int(step))
    elif fault == "desync":
        rank, step, *overrides = rest
        desync(int(rank), int(step))
    elif fault == "signal_at_start":
        rank, *overrides = rest
        signal_at_start(int(rank))
    elif fault == "lagging_listing":
        overrides = rest
        lagging_listing()
    else:
        raise SystemExit(f"unknown fault {fault!r}")
    from sora_train.cli import main as cli

    sys.argv = [sys.argv[0], *overrides]
    cli()


if __name__ == "__main__":
    main()
