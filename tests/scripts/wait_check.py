"""`wait_for_main` on 2 processes: rank 0 works for WORK seconds, both then wait at most LIMIT.

Writes OUT.RANK: "ok SECONDS" or "failed SECONDS MESSAGE", the seconds this rank spent waiting.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from sora_train.parallel.dist import WaitForMainFailed, init_distributed, leave_process, wait_for_main


def main(work_s: float, limit_s: float, out: str) -> int:
    info = init_distributed()
    if info.is_main:
        time.sleep(work_s)
    started = time.monotonic()
    try:
        wait_for_main("finish its work", limit_s)
        result, code = "ok", 0
    except WaitForMainFailed as error:
        result, code = f"failed {error!s}", 1
    waited = time.monotonic() - started
    Path(f"{out}.{os.environ['RANK']}").write_text(f"{waited:.2f} {result}\n")
    return code


if __name__ == "__main__":
    leave_process(main(float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]))
