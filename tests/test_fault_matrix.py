"""The fault-injection matrix: real 2-process runs (torchrun over gloo, DeepSpeed ZeRO-2) with one fault
injected at a precise point of the code (tests/scripts/faulty_train.py), then reruns.

Nothing may be lost. After each fault the run dir holds every complete checkpoint it held (but for
normal pruning) and nothing a resume trusts that is not complete; the rerun (`resume=auto`, the
default) resumes from the newest complete checkpoint, and trains from there bitwise as the
uninterrupted reference run (`two_process_run`) does.

The faults of a kind form one chain on one run dir: each launch starts where the previous fault left
the run, so it is that fault's rerun, and the chain's last launch, fault-free, must end bitwise as the
reference (which it can only do if every resume on the way was exact). Each link is a parametrized
case checking the state its fault left and where, and how, the next launch resumed. One launch per
fault instead of two keeps the matrix to about 15 launches.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pytest

from sora_train.checkpoint import verify_checkpoint
from sora_train.checkpoint.store import CheckpointStore, checkpoint_root, is_checkpoint_dir, tag_for
from sora_train.metrics import read_metrics
from sora_train.preemption import EXIT_PREEMPTED, MARKER

from .conftest import assert_ok, run_args, run_python, run_torchrun, run_train
from .test_distributed import assert_same_training

pytestmark = pytest.mark.distributed
FAULTY = Path(__file__).parent / "scripts" / "faulty_train.py"
LEFTOVER_PREFIXES = (".staging-", ".trash-", ".latest")  # never resumed from; cleared by the next save


@dataclass(frozen=True)
class Checkpoints:
    """What RUN_DIR/checkpoints holds: complete checkpoints (their manifest verifies, checksums
    included), torn ones (named like a checkpoint, not verifying), what `latest` names, and leftovers
    of interrupted saves and deletions with the files in each."""

    complete: list[str]
    torn: list[str]
    latest: str | None
    leftovers: dict[str, list[str]] = field(default_factory=dict)


def inspect_checkpoints(run_dir: Path) -> Checkpoints:
    """The state of a run's checkpoints now."""
    root = checkpoint_root(run_dir)
    entries = sorted(root.iterdir()) if root.is_dir() else []
    named = [p for p in entries if is_checkpoint_dir(p)]
    complete = [p.name for p in named if not verify_checkpoint(p)]
    leftovers = {
        p.name: sorted(f.name for f in p.iterdir()) if p.is_dir() else []
        for p in entries
        if p.name.startswith(LEFTOVER_PREFIXES) or p.name.endswith(".partial")
    }
    torn = [p.name for p in named if p.name not in complete]
    return Checkpoints(complete, torn, CheckpointStore(root).latest_name(), leftovers)


def torchrun_exit_codes(output: str) -> dict[int, int]:
    """Each failed rank's exit code, from torchrun's failure report (a rank absent exited 0)."""
    found = re.findall(r"rank\s*: (\d+) \(local_rank: \d+\)\s*exitcode\s*: (-?\d+)", output)
    return {int(rank): int(code) for rank, code in found}


@dataclass
class Launch:
    """One launch of a chain and the run dir as it left it."""

    fault: tuple[str, ...]
    result: subprocess.CompletedProcess = field(repr=False)
    checkpoints: Checkpoints
    marker: dict | None  # RUN_DIR/preempted.json
    metrics: list[dict] = field(repr=False)  # metrics.jsonl

    @property
    def output(self) -> str:
        """Its stdout and stderr."""
        return self.result.stdout + self.result.stderr

    @property
    def exit_codes(self) -> dict[int, int]:
        """Each failed rank's exit code (`torchrun_exit_codes`)."""
        return torchrun_exit_codes(self.output)

    @property
    def steps(self) -> dict[int, dict]:
        """The step rows of the run so far, by step."""
        return {row["step"]: row for row in self.metrics if "loss" in row}

    def describe(self) -> str:
        """The fault, the exit status and the end of the output, for a failing assertion."""
        return f"{' '.join(self.fault)}: exit {self.result.returncode}\n{self.output[-3000:]}"


@dataclass
class Chain:
    """The launches of one chain on one run dir, in order (the last one without a fault)."""

    run_dir: Path
    launches: list[Launch]


def run_chain(
    corpus: Path, run_dir: Path, faults: list[tuple[str, ...]], *overrides: str, last: tuple[str, ...] = ()
) -> Chain:
    """Launch the faulty script once per fault on `run_dir` (torchrun, 2 processes), then the last
    launch, which runs to the end: sora-train, or the faulty script with the fault `last`; records
    the run dir after each."""
    launches = []
    for fault in [*faults, last]:
        args = [*run_args(corpus), f"run_dir={run_dir}", *overrides]
        if fault:
            result = run_torchrun(2, FAULTY, *fault, *args, timeout=240)
        else:
            result = run_train(*args, "launch.nproc_per_node=2", timeout=240)
        marker = json.loads((run_dir / MARKER).read_text()) if (run_dir / MARKER).exists() else None
        launches.append(Launch(fault, result, inspect_checkpoints(run_dir), marker, read_metrics(run_dir)))
    return Chain(run_dir, launches)


def assert_trained_as_reference(launch: Launch, reference: Path, after: int) -> None:
    """The steps `launch` trained after resuming at `after`: the reference's batches and losses."""
    theirs = {
        row["step"]: (row["batch_hash"], row["loss"]) for row in read_metrics(reference) if "loss" in row
    }
    trained = {step: (row["batch_hash"], row["loss"]) for step, row in launch.steps.items() if step > after}
    assert trained == {step: theirs[step] for step in trained}


# ---- a fault while saving: a full disk, or SIGKILL at each point of the save ----------------------


class SaveFault(NamedTuple):
    """A fault during a save, and the state it must leave."""

    name: str
    args: tuple[str, ...]  # faulty_train.py's
    rank: int  # the rank it hits
    complete: list[int]  # the steps of the complete checkpoints it leaves
    latest: int  # the step `latest` names
    leftover: str  # the leftover it leaves
    resumes_at: int  # the step the next launch resumes from


# Checkpoints every 2 steps, keep_last=1; each launch resumes where the previous fault left the run.
SAVE_FAULTS = [
    # rank 1's first tensor file of the save of step 4 is half-written when the disk fills up
    SaveFault("disk full", ("disk_full", "1", "1", "4"), 1, [2], 2, ".staging-step_0000004", 2),
    # every file staged: rank 1 killed while it flushes and checksums its own
    SaveFault("kill in save", ("kill_at", "save", "1", "4"), 1, [2], 2, ".staging-step_0000004", 2),
    # manifest written, the staging directory not yet renamed into place
    SaveFault("kill before rename", ("kill_at", "rename", "0", "4"), 0, [2], 2, ".staging-step_0000004", 2),
    # renamed into place, `latest` still naming step 2: the newest complete one is resumed all the same
    SaveFault("kill before latest", ("kill_at", "latest", "0", "4"), 0, [2, 4], 2, "", 4),
    # step 6 committed, then step 4 pruned: renamed aside for deletion, one of its files deleted
    SaveFault("kill in prune", ("kill_at", "prune", "0", "4"), 0, [2, 6], 6, ".trash-step_0000004", 6),
]


@pytest.fixture(scope="module")
def save_chain(corpus, tmp_path_factory) -> Chain:
    """SAVE_FAULTS in turn on one run dir, then a rerun without a fault."""
    run_dir = tmp_path_factory.mktemp("faults") / "save"
    faults = [fault.args for fault in SAVE_FAULTS]
    return run_chain(corpus, run_dir, faults, "checkpoint.every=2", "checkpoint.keep_last=1")


@pytest.mark.parametrize("index", range(len(SAVE_FAULTS)), ids=[fault.name for fault in SAVE_FAULTS])
def test_a_save_that_fails_keeps_every_complete_checkpoint_and_the_rerun_resumes_the_newest(
    save_chain, two_process_run, index
):
    """The fault stops the run, leaves the complete checkpoints and `latest` it must, and a leftover
    the rerun does not trust; the rerun resumes from the newest complete checkpoint and trains as
    the reference does."""
    fault, launch, rerun = SAVE_FAULTS[index], save_chain.launches[index], save_chain.launches[index + 1]
    root = checkpoint_root(save_chain.run_dir)
    if fault.args[0] == "disk_full":  # a clear error on the rank that hit it; the others stop too
        staged = root / fault.leftover / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        message = f"saving {tag_for(4)} failed on rank 1: [Errno 28] No space left on device: '{staged}'"
        assert message in launch.output, launch.describe()
        assert launch.exit_codes == {0: 1, 1: 1}, launch.describe()
    else:
        assert launch.exit_codes[fault.rank] == -signal.SIGKILL, launch.describe()
    assert launch.result.returncode != 0 and launch.marker is None
    leftovers = launch.checkpoints.leftovers
    assert (launch.checkpoints.complete, launch.checkpoints.torn, launch.checkpoints.latest) == (
        [tag_for(step) for step in fault.complete], [], tag_for(fault.latest)
    )  # fmt: skip
    assert sorted(leftovers) == ([fault.leftover] if fault.leftover else [])
    if fault.leftover.startswith(".staging-"):  # never resumed from, even with its manifest written
        assert ("manifest.json" in leftovers[fault.leftover]) == (fault.args[1] == "rename")
        assert f"checkpoint passed over: {fault.leftover}: a save that never finished" in rerun.output
    if fault.leftover.startswith(".trash-"):  # what the deletion had left of a whole checkpoint
        assert "manifest.json" in leftovers[fault.leftover] and len(leftovers[fault.leftover]) > 3
    assert f"resumed from {root / tag_for(fault.resumes_at)} at step {fault.resumes_at}" in rerun.output, (
        rerun.describe()
    )
    assert_trained_as_reference(rerun, two_process_run, after=fault.resumes_at)


def test_after_every_failed_save_the_run_ends_bitwise_as_the_uninterrupted_one(save_chain, two_process_run):
    """Through all of SAVE_FAULTS the run trains every step as the reference does and ends with its
    weights, EMA and optimizer shards byte for byte; the leftovers are gone."""
    final = save_chain.launches[-1]
    assert_ok(final.result)
    assert final.checkpoints == Checkpoints([tag_for(8)], [], tag_for(8), {})  # keep_last=1
    assert_same_training(save_chain.run_dir, two_process_run, range(1, 9))


# ---- SIGUSR1 in each phase of start-up and training -----------------------------------------------


class Phase(NamedTuple):
    """Where a preemption signal lands, and the step the run must stop at."""

    name: str  # faulty_train.py's SIGNAL_PHASES
    rank: int  # the rank signalled
    step: int  # the step whose work it interrupts (0: start-up)
    stops_at: int  # the step boundary the ranks agree to stop at


# Checkpoints every 2 steps; each launch resumes where the previous one stopped (the first is fresh).
PHASES = [
    Phase("start", 1, 0, 0),  # before the checkpoint is chosen (a fresh run: nothing to choose)
    Phase("step", 1, 2, 2),  # in the forward of step 2
    Phase("verify", 0, 0, 2),  # while step 2's checkpoint is verified against its manifest
    Phase("index", 1, 0, 2),  # while the loader indexes the shards
    Phase("engine", 0, 0, 2),  # engine built and restored, before the first step
    Phase("validation", 0, 4, 5),  # after the first batch of the validation at step 4: seen after step 5
    Phase("save", 1, 6, 6),  # in the save of step 6, every file staged
]


@pytest.fixture(scope="module")
def preemption_chain(corpus, tmp_path_factory) -> Chain:
    """A SIGUSR1 in each of PHASES in turn on one run dir, then a rerun to the end with a SIGUSR1 to
    rank 1 during the final validation (after the last step)."""
    run_dir = tmp_path_factory.mktemp("faults") / "preempted"
    faults = [("signal_at", phase.name, str(phase.rank), str(phase.step)) for phase in PHASES]
    return run_chain(
        corpus, run_dir, faults, "checkpoint.every=2", last=("signal_at", "validation", "1", "8")
    )


@pytest.mark.parametrize("index", range(len(PHASES)), ids=[phase.name for phase in PHASES])
def test_sigusr1_in_each_phase_stops_every_rank_with_75_and_the_rerun_resumes_there(
    preemption_chain, two_process_run, index
):
    """Every rank exits 75 at the same step boundary, after a checkpoint of that step (none before a
    fresh run's first step), with the marker and nothing half-written; the rerun resumes there and
    trains as the reference does."""
    phase, launch = PHASES[index], preemption_chain.launches[index]
    rerun, stopped = preemption_chain.launches[index + 1], PHASES[index].stops_at
    assert launch.exit_codes == {0: EXIT_PREEMPTED, 1: EXIT_PREEMPTED}, launch.describe()
    event = [row for row in launch.metrics if row.get("event") == "preempted"][-1]
    signals = [None, None]
    signals[phase.rank] = int(signal.SIGUSR1)
    assert (event["step"], event["signals_by_rank"]) == (stopped, signals)
    assert max(launch.steps, default=0) == stopped  # no step after the agreed boundary
    checkpoints, root = launch.checkpoints, checkpoint_root(preemption_chain.run_dir)
    assert checkpoints.torn == [] and checkpoints.leftovers == {}  # nothing half-written
    if stopped:
        assert checkpoints.complete[-1] == checkpoints.latest == tag_for(stopped)
        assert launch.marker["checkpoint"] == str(root / tag_for(stopped))
        assert f"resumed from {root / tag_for(stopped)} at step {stopped}" in rerun.output, rerun.describe()
    else:  # signalled before a fresh run's first step: nothing saved, the rerun starts afresh
        assert checkpoints == Checkpoints([], [], None, {}) and launch.marker["checkpoint"] is None
        assert "resumed from" not in rerun.output and 1 in rerun.steps
    assert launch.marker["step"] == stopped
    assert_trained_as_reference(rerun, two_process_run, after=stopped)


def test_after_every_preemption_the_run_ends_bitwise_as_the_uninterrupted_one(
    preemption_chain, two_process_run
):
    """Through all of PHASES the run trains every step as the reference does and ends with its
    weights, EMA and optimizer shards byte for byte. A signal after the last step (during the final
    validation) is recorded, not acted on: the run finishes (exit 0) and says so."""
    final = preemption_chain.launches[-1]
    assert_ok(final.result)
    assert final.marker is None  # removed when the run resumed
    assert "rank 1: SIGUSR1 came after the last step: the run finished" in final.output, final.describe()
    assert [row["step"] for row in final.metrics if row.get("event") == "validation"][-1] == 8
    assert_same_training(preemption_chain.run_dir, two_process_run, range(1, 9))


# ---- a rank that hangs ---------------------------------------------------------------------------


def test_a_rank_that_hangs_fails_the_run_at_the_collective_timeout(corpus, tmp_path):
    """Rank 1 sleeps for ever as step 6 begins: rank 0 fails in the step's gradient all-reduce (on
    DeepSpeed's data-parallel group) after `parallel.collective_timeout_s` (15 s), then torchrun stops
    rank 1 (SIGTERM, which a hung rank does not act on, then SIGKILL 30 s later). Step 4's checkpoint stays."""
    run_dir = tmp_path / "hang"
    args = [*run_args(corpus), "parallel.collective_timeout_s=15", f"run_dir={run_dir}"]
    started = time.monotonic()
    result = run_torchrun(2, FAULTY, "hang", "1", "6", "step", *args, timeout=180)
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert "Timed out waiting 15000ms" in output, output[-3000:]
    assert torchrun_exit_codes(output) == {0: 1, 1: -signal.SIGKILL}, output[-3000:]
    assert max(r["step"] for r in read_metrics(run_dir) if "loss" in r) == 5
    assert inspect_checkpoints(run_dir) == Checkpoints([tag_for(4)], [], tag_for(4), {})
    assert 15 < elapsed < 100, elapsed


GROUP_TIMEOUTS = """
import torch, torch.distributed as dist
from deepspeed.utils import groups
from sora_train.parallel.dist import init_distributed, leave_process, shutdown_distributed

init_distributed(1, timeout_s=7)
def seconds(group):
    return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()
print("default group", seconds(dist.group.WORLD), "ZeRO data-parallel group", seconds(groups._get_data_parallel_group()))
shutdown_distributed()
leave_process(0)
"""


def test_zero_data_parallel_group_times_out_at_the_configured_limit():
    """The collectives of a step (gradient reduction, parameter all-gather) run on DeepSpeed's
    data-parallel group, which DeepSpeed makes without a timeout: it gets
    `parallel.collective_timeout_s` too, not torch's backend default (30 min gloo, 10 min NCCL)."""
    result = run_python("-c", GROUP_TIMEOUTS, timeout=120)
    assert_ok(result)
    assert "default group 7.0 ZeRO data-parallel group 7.0" in result.stdout, result.stdout
