"""sora-train with one fault injected, for the recovery tests (runs alone or under torchrun).

python faulty_train.py nan RANK STEPS [overrides]    RANK's loss is NaN at STEPS (comma-separated)
python faulty_train.py crash_in_save STEP [overrides] SIGKILL this process halfway through the save
                                                     at STEP: every file written, none checksummed
python faulty_train.py desync RANK STEP [overrides]  change one weight on RANK after the update of STEP
python faulty_train.py lagging_listing [overrides]   each rank's listing of a staging directory misses
                                                     the files the other ranks wrote (a network
                                                     filesystem's attribute cache)
python faulty_train.py kill_at POINT RANK STEP [overrides]  SIGKILL RANK at POINT (KILL_POINTS)
python faulty_train.py signal_at PHASE RANK STEP [overrides]  SIGUSR1 to RANK in PHASE (SIGNAL_PHASES;
                                                     STEP is ignored by the start-up phases)
python faulty_train.py disk_full RANK N STEP [overrides]  the Nth tensor file RANK writes into the
                                                     save of STEP stops halfway with ENOSPC
python faulty_train.py hang RANK STEP WHERE [overrides]  RANK sleeps for ever at WHERE of step STEP
                                                     (HANG_POINTS), before a collective its peers wait in

Every hook fires on one rank at a precise point of the code (a patched function of sora_train), so
a fault lands at the same place in every run, however loaded the machine is.
"""

from __future__ import annotations

import errno
import io
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

# The optimizer step this process is in (or has just finished: its save and validation follow it);
# None during start-up. Set by `track_steps`.
PROGRESS: dict[str, int | None] = {"step": None}


def this_rank() -> int:
    """This process' global rank (0 outside torchrun)."""
    return int(os.environ.get("RANK", 0))


def inject_nan(rank: int, steps: set[int]) -> None:
    """Multiply the loss by NaN on `rank` at `steps` (one micro-batch per step), so the gradients are NaN."""
    import sora_train.loop.step as step

    real_loss, calls = step.flow_loss, [0]

    def flow_loss(*args, **kwargs):
        calls[0] += 1
        loss = real_loss(*args, **kwargs)
        hit = this_rank() == rank and calls[0] in steps
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
        if this_rank() == rank and calls[0] == step:
            next(model.parameters()).data.add_(1e-3)
        return real_update(self, model)

    EMA.update = update


def lagging_listing() -> None:
    """Hide from each rank's listings the files whose names carry another rank's number."""
    import sora_train.checkpoint.saving as saving

    real_list, rank, world = saving.list_files, this_rank(), int(os.environ["WORLD_SIZE"])
    others = [r for r in range(world) if r != rank]

    def list_files(directory: Path) -> list[str]:
        hidden = [f"rank_{r}_" for r in others] + [f"rank_{r:05d}" for r in others]
        return [name for name in real_list(directory) if not any(mark in name for mark in hidden)]

    saving.list_files = list_files


def before_call(owner: object, name: str, action: Callable[[], None], when: Callable[..., bool]) -> None:
    """Replace `owner.name` (a function or method) by one that runs `action()` before the real call,
    the first time `when(*args, **kwargs)` holds."""
    real, fired = getattr(owner, name), [False]

    def hooked(*args, **kwargs):
        if not fired[0] and when(*args, **kwargs):
            fired[0] = True
            action()
        return real(*args, **kwargs)

    setattr(owner, name, hooked)


def track_steps() -> None:
    """Record in PROGRESS the optimizer step each `Stepper.train_step` call starts."""
    from sora_train.loop.step import Stepper

    real_step = Stepper.train_step

    def train_step(self, batches, step):
        PROGRESS["step"] = step
        return real_step(self, batches, step)

    Stepper.train_step = train_step


def at_step(step: int) -> Callable[..., bool]:
    """A `when` for `before_call`: the call happens during (or right after) optimizer step `step`."""
    return lambda *args, **kwargs: PROGRESS["step"] == step


def send(number: int) -> Callable[[], None]:
    """An action: this process sends itself signal `number`."""
    return lambda: os.kill(os.getpid(), number)


def kill_at(point: str, rank: int, step: int) -> None:
    """SIGKILL `rank` at `point` (see KILL_POINTS) of the save of `step` (of the checkpoint at `step`
    for "prune"). Rank 0 alone commits and prunes."""
    import shutil

    import sora_train.checkpoint.saving as saving
    from sora_train.checkpoint.store import TRASH_PREFIX, CheckpointStore, tag_for

    if point not in KILL_POINTS:
        raise SystemExit(f"unknown kill point {point!r}; one of {KILL_POINTS}")
    if this_rank() != rank:
        return
    tag, kill = tag_for(step), send(signal.SIGKILL)
    if point == "save":  # every file staged; this rank flushing and checksumming the ones it wrote
        before_call(saving, "describe_files", kill, lambda directory, names: directory.name.endswith(tag))
    elif point == "rename":  # the manifest written, the staging directory not yet renamed
        before_call(CheckpointStore, "commit", kill, lambda store, saved: saved == step)
    elif point == "latest":  # the checkpoint renamed into place, `latest` not yet moved to it
        before_call(CheckpointStore, "point_latest", kill, lambda store, name: name == tag)
    else:  # prune: the checkpoint at `step` renamed aside for deletion, one of its files deleted
        trash, real_rmtree = f"{TRASH_PREFIX}{tag}", shutil.rmtree

        def rmtree(path, *args, **kwargs):
            if Path(path).name == trash and Path(path).is_dir():
                next(p for p in sorted(Path(path).iterdir()) if p.is_file()).unlink()
                kill()
            return real_rmtree(path, *args, **kwargs)

        shutil.rmtree = rmtree


KILL_POINTS = ("save", "rename", "latest", "prune")


def signal_at(phase: str, rank: int, step: int) -> None:
    """Send SIGUSR1 to `rank` in `phase` (see SIGNAL_PHASES); `step` places the training phases."""
    import sora_train.checkpoint.resuming as resuming
    import sora_train.checkpoint.saving as saving
    import sora_train.data.loader as loader
    import sora_train.loop.step as step_module
    import sora_train.loop.validator as validator
    import sora_train.train as train

    if phase not in SIGNAL_PHASES:
        raise SystemExit(f"unknown phase {phase!r}; one of {SIGNAL_PHASES}")
    if this_rank() != rank:
        return
    usr1, always = send(signal.SIGUSR1), lambda *args, **kwargs: True
    hooks = {
        "start": (train, "prepare_resume", always),  # before the checkpoint is chosen
        "verify": (resuming, "verify_checkpoint", always),  # checking a candidate against its manifest
        "index": (loader, "shard_indexes", always),  # the training loader indexing its shards
        "engine": (train, "start_logging", always),  # engine built and restored, no step yet
        "step": (step_module, "forward_backward", at_step(step)),  # before the forward of `step`
        "save": (saving, "list_files", at_step(step)),  # the save of `step`: every file staged
    }
    if phase == "validation":  # after the first batch of the validation pass at `step`
        real_checked = validator.group_checked

        def group_checked(batches, info):
            for count, batch in enumerate(real_checked(batches, info)):
                if count == 1 and PROGRESS["step"] == step:
                    usr1()
                yield batch

        validator.group_checked = group_checked
    else:
        owner, name, when = hooks[phase]
        before_call(owner, name, usr1, when)


SIGNAL_PHASES = ("start", "verify", "index", "engine", "step", "save", "validation")


def disk_full(rank: int, nth: int, step: int) -> None:
    """On `rank`, the `nth` torch.save into a staging directory during the save of `step` writes half
    of its bytes and raises OSError(ENOSPC), as a full disk does."""
    import torch

    if this_rank() != rank:
        return
    real_save, calls = torch.save, [0]

    def save(obj, f, *args, **kwargs):
        if isinstance(f, str | Path) and ".staging-" in str(f) and PROGRESS["step"] == step:
            calls[0] += 1
            if calls[0] == nth:
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                Path(f).write_bytes(buffer.getvalue()[: buffer.tell() // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


def hang(rank: int, step: int, where: str) -> None:
    """`rank` sleeps for ever at `where` of optimizer step `step`: "step" as the step begins (its peers
    then wait in the step's gradient all-reduce, on DeepSpeed's data-parallel group), "boundary" after
    the step, before the ranks agree on a preemption (its peers wait in that all-reduce, on the default
    group). Like a rank stuck in a kernel, it ignores SIGTERM (the preemption watch only sets a flag)."""
    from sora_train.loop.checkpointer import Checkpointer
    from sora_train.loop.step import Stepper

    def sleep_for_ever() -> None:
        while True:
            time.sleep(3600)

    if where not in HANG_POINTS:
        raise SystemExit(f"unknown hang point {where!r}; one of {HANG_POINTS}")
    if this_rank() != rank:
        return
    if where == "step":
        before_call(Stepper, "train_step", sleep_for_ever, lambda stepper, batches, at: at == step)
    else:
        before_call(Checkpointer, "preempted", sleep_for_ever, lambda checkpointer, at: at == step)


HANG_POINTS = ("step", "boundary")


FAULTS: dict[str, tuple[Callable[..., None], int]] = {  # name: (install it from its arguments, how many)
    "nan": (lambda rank, steps: inject_nan(int(rank), {int(s) for s in steps.split(",")}), 2),
    "crash_in_save": (lambda step: crash_in_save(int(step)), 1),
    "desync": (lambda rank, step: desync(int(rank), int(step)), 2),
    "lagging_listing": (lagging_listing, 0),
    "kill_at": (lambda point, rank, step: kill_at(point, int(rank), int(step)), 3),
    "signal_at": (lambda phase, rank, step: signal_at(phase, int(rank), int(step)), 3),
    "disk_full": (lambda rank, nth, step: disk_full(int(rank), int(nth), int(step)), 3),
    "hang": (lambda rank, step, where: hang(int(rank), int(step), where), 3),
}


def main() -> None:
    """Install the fault named by the first argument, then run sora-train with the remaining overrides."""
    fault, *rest = sys.argv[1:]
    if fault not in FAULTS:
        raise SystemExit(f"unknown fault {fault!r}; one of {sorted(FAULTS)}")
    install, count = FAULTS[fault]
    track_steps()
    install(*rest[:count])
    from sora_train.cli import main as cli

    sys.argv = [sys.argv[0], *rest[count:]]
    cli()


if __name__ == "__main__":
    main()
