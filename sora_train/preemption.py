"""Cooperative preemption: a signal only sets a flag; the ranks agree at a step boundary,
save, and exit with a code a job script can requeue on.

SLURM sends `--signal=B:USR1@N` ahead of the time limit and SIGTERM on preemption;
`sora_train.launcher` (torchrun with the signals relayed) passes both on to the training processes. The exit code is EX_TEMPFAIL (75): "try again later".
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
EXIT_PREEMPTED = 75
MARKER = "preempted.json"  # in the run dir: written after the checkpoint, removed when the run resumes


class PreemptionWatch:
    """Records the first of PREEMPT_SIGNALS this process receives; nothing else happens in the handler."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous = {}

    def install(self) -> PreemptionWatch:
        """Handle PREEMPT_SIGNALS from now on, and unblock them in this thread: a process that
        `sora_train.launcher` started holds them blocked until then, so one that arrived during its
        start-up is delivered now rather than lost or fatal."""
        for number in PREEMPT_SIGNALS:
            self._previous[number] = signal.signal(number, self._handle)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, PREEMPT_SIGNALS)
        return self

    def _handle(self, number: int, frame) -> None:
        if self.signal is None:
            self.signal = number

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def uninstall(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()


def signal_name(number: int | None) -> str:
    """SIGUSR1 for 10, and so on."""
    return "no signal" if number is None else signal.Signals(number).name


def mark_preempted(run_dir: str | Path, step: int, checkpoint: Path | None) -> None:
    """Leave RUN_DIR/preempted.json for the launcher (torchrun reports any worker exit as 1);
    `checkpoint` None: stopped before a fresh run's first step."""
    marker = {
        "step": step,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "time": time.time(),
    }
    (Path(run_dir) / MARKER).write_text(json.dumps(marker) + "\n")


def clear_preempted(run_dir: str | Path) -> None:
    (Path(run_dir) / MARKER).unlink(missing_ok=True)


def was_preempted(run_dir: str | Path, since: float) -> bool:
    """Whether the run left a preemption marker at or after `since` (a time.time() value)."""
    try:
        return json.loads((Path(run_dir) / MARKER).read_text())["time"] >= since
    except (OSError, ValueError, KeyError):
        return False


def requeue_slurm_job() -> bool:
    """`scontrol requeue $SLURM_JOB_ID` when running under SLURM; returns whether it was asked."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{task}" if array_job and task else os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
    if result.returncode:
        print(f"scontrol requeue {job} failed: {result.stderr.strip()}", file=sys.stderr, flush=True)
    return result.returncode == 0


if __name__ == "__main__":  # for launch scripts: exit 0 when RUN_DIR was preempted since SINCE
    sys.exit(0 if was_preempted(sys.argv[1], float(sys.argv[2])) else 1)
