"""What the benches print about the machine they ran on: the hypervisor's steal and the versions."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def steal_jiffies() -> tuple[int, int]:
    """(stolen, total) CPU time of the whole machine so far, in clock ticks: what the hypervisor took
    (the first line of /proc/stat)."""
    ticks = [int(n) for n in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return ticks[7], sum(ticks)


def environment(libraries: str) -> str:
    """One line: the machine, Python, and `libraries` (the bench's own "name version, ..." list)."""
    return (
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"Python {platform.python_version()}, {libraries}"
    )
