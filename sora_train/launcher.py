"""torchrun for preemptible jobs: `python -m sora_train.launcher [torchrun options] -m sora_train.cli ...`.

This is `torch.distributed.run` with the preemption signals (SIGUSR1, SIGTERM) passed on to the
training processes instead of acted on. SLURM may deliver such a signal to the batch shell only
(which passes it on through srun to every process of the step), to every process of the step, or
to the launcher only; in each case the training processes must get it, and the launcher must
live on to report their exit:

- plain torchrun does not handle SIGUSR1, so it dies of it (and `--kill-on-bad-exit` then kills
  the step before any checkpoint); here the launcher passes it on to the training processes;
- on SIGTERM plain torchrun stops its workers (SIGTERM, then SIGKILL 30 s later, whatever they are
  doing); here the launcher passes it on too, and the training processes checkpoint at the next
  step and exit 75 on their own. SIGINT (Ctrl-C), SIGHUP and SIGQUIT still stop them at once.

The training processes start with both signals blocked (a blocked signal waits; it is neither lost
nor fatal) and unblock them once their preemption watch is installed, so a signal during their
start-up stops them cleanly too. Linux only: children are found in /proc.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

from .preemption import PREEMPT_SIGNALS as RELAYED_SIGNALS

RELAY_THREAD = "preemption-signal-relay"
TORCHRUN_HANDLED = "TORCHELASTIC_SIGNALS_TO_HANDLE"  # torchrun's own handlers stop the workers


def child_pids(parent: int) -> list[int]:
    """The pids of the live processes whose parent is `parent`."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        except (OSError, IndexError):
            continue  # ended while listed
        if int(fields[1]) == parent:
            children.append(int(stat.parent.name))
    return children


def relay(number: int) -> list[int]:
    """Send signal `number` to every child of this process; returns the pids it reached."""
    reached = []
    for pid in child_pids(os.getpid()):
        try:
            os.kill(pid, number)
            reached.append(pid)
        except ProcessLookupError:
            continue
    return reached


def _relay_forever(signals: tuple[int, ...]) -> None:
    while True:
        number = signal.sigwait(signals)
        reached = relay(number)
        print(
            f"launcher: {signal.Signals(number).name} passed on to the training processes {reached}",
            file=sys.stderr,
            flush=True,
        )


def hold_and_relay_signals(signals: tuple[int, ...] = RELAYED_SIGNALS) -> None:
    """From now on this process passes `signals` (some of RELAYED_SIGNALS) on to its children
    instead of acting on them.

    Call first, before any thread starts: the signals are blocked here and in every thread and
    child started later (children inherit the block), and one thread takes them with sigwait.
    A Python handler relays too, for a signal that reaches a thread started before the block.
    Only the first call does anything.
    """
    if not signals or any(thread.name == RELAY_THREAD for thread in threading.enumerate()):
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    for number in signals:
        signal.signal(number, lambda received, _frame: relay(received))
    handled = os.environ.get(TORCHRUN_HANDLED, "SIGTERM,SIGINT,SIGHUP,SIGQUIT").split(",")
    os.environ[TORCHRUN_HANDLED] = ",".join(s for s in handled if s.strip() not in ("SIGTERM", "SIGUSR1"))
    threading.Thread(target=_relay_forever, args=(signals,), name=RELAY_THREAD, daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    """torchrun's command line, with the signals relayed."""
    hold_and_relay_signals()
    from torch.distributed.run import main as torchrun_main

    torchrun_main(argv)


if __name__ == "__main__":
    main()
