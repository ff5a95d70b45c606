"""A training process's start-up under sora_train.launcher: a signal sent before its preemption
watch is installed is neither lost nor fatal.

Waits until the file argv[1] exists (the test signals the launcher, then creates it), installs the
watch, and writes which signal the watch recorded to argv[2]. RANK-suffixed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from sora_train.preemption import PreemptionWatch

go, out = Path(sys.argv[1]), Path(sys.argv[2])
status = Path("/proc/self/status").read_text().splitlines()
blocked = int(next(line for line in status if line.startswith("SigBlk")).split()[1], 16)
while not go.exists():
    time.sleep(0.01)
watch = PreemptionWatch().install()
time.sleep(0.2)  # the pending signal's handler runs at the next bytecode boundary
Path(f"{out}.{os.environ['RANK']}").write_text(f"{blocked} {watch.signal}\n")
