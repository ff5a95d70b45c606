"""sora_train.launcher: torchrun that passes the preemption signals on to the training processes."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sora_train.launcher import child_pids

SCRIPTS = Path(__file__).parent / "scripts"


def wait_for(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("number", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_to_the_launcher_during_start_up_waits_for_each_process_s_watch(tmp_path, number):
    """The processes start with the signal blocked; the launcher lives on and relays it; each
    process's watch records it once installed, and the launcher reports their exit."""
    go, out = tmp_path / "go", tmp_path / "seen"
    command = [
        sys.executable, "-m", "sora_train.launcher", "--standalone", "--nproc-per-node=2",
        str(SCRIPTS / "held_signal.py"), str(go), str(out),
    ]  # fmt: skip
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: len(child_pids(launcher.pid)) == 2)
    time.sleep(0.5)  # both past exec, their watch not yet installed
    launcher.send_signal(number)
    time.sleep(0.5)
    assert launcher.poll() is None  # plain torchrun dies of SIGUSR1 and stops its workers on SIGTERM
    go.touch()
    output, _ = launcher.communicate(timeout=60)
    assert launcher.returncode == 0, output
    mask = (1 << (signal.SIGUSR1 - 1)) | (1 << (signal.SIGTERM - 1))
    for rank in (0, 1):
        blocked, seen = Path(f"{out}.{rank}").read_text().split()
        assert int(blocked) & mask == mask and int(seen) == number
    assert f"{signal.Signals(number).name} passed on to the training processes" in output
