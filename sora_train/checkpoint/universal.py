"""Converting a ZeRO checkpoint for a different number of data-parallel ranks.

DeepSpeed's universal checkpoint stores each parameter's fp32 weights and optimizer moments
whole, so any number of ranks can partition them again. The conversion runs once, on rank 0,
into the resuming run's RUN_DIR/checkpoints/step_XXXXXXX.universal/, and is reused by later
resumes of the same checkpoint (the same path and manifest). It runs in a fresh process (a
training process holds communication threads and maybe CUDA, neither of which may be forked) with
parallel extract and merge workers; the other ranks wait at most `conversion_seconds`.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

from .manifest import MANIFEST, fsync_path
from .safe_load import weights_only_loads

UNIVERSAL_INFO = {"universal_checkpoint_version": 0.4}  # written into every save, so any save converts
_DONE = ".converted"
SLOWEST_BYTES_PER_S = 20e6  # a conversion reads and writes each byte once: a slow network filesystem
STARTUP_S = 600.0  # a fresh process importing DeepSpeed, and a margin


def conversion_workers(cpus: int | None = None) -> int:
    """Extract workers for a conversion on rank 0 while the node's other ranks wait: half the
    CPUs, between 2 and 16 (each holds one rank's optimizer shard in memory)."""
    return max(2, min(16, (cpus or os.cpu_count() or 1) // 2))


def conversion_seconds(checkpoint: Path) -> float:
    """How long the ranks waiting for rank 0 to convert `checkpoint` may wait: a fresh process's
    start plus every byte of the checkpoint read and written at SLOWEST_BYTES_PER_S."""
    size = sum(path.stat().st_size for path in checkpoint.rglob("*") if path.is_file())
    return STARTUP_S + 2 * size / SLOWEST_BYTES_PER_S


def convert_to_universal(checkpoint: Path, out: Path, workers: int = 2) -> Path:
    """Write the universal form of `checkpoint` to `out` (skipped when one of the same checkpoint is
    there), with `workers` extract processes (a quarter as many merge them).

    Runs `python -m sora_train.checkpoint.universal` (source files read with `weights_only`
    loads); the result appears in one rename. A failed conversion raises CalledProcessError with
    the converter's last output.
    """
    source = f"{checkpoint.resolve()}\n{zlib.crc32((checkpoint / MANIFEST).read_bytes()):08x}\n"
    if (out / _DONE).is_file() and (out / _DONE).read_text() == source:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", __name__, str(checkpoint), str(partial), str(workers)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        tail = (result.stdout + result.stderr)[-4000:]
        raise subprocess.CalledProcessError(result.returncode, command, output=tail)
    (out.parent / "latest_universal").unlink(missing_ok=True)  # a pointer to the .partial name
    (partial / _DONE).write_text(source)
    os.replace(partial, out)
    fsync_path(out.parent)
    return out


def _convert(checkpoint: str, out: str, workers: int) -> None:
    """The conversion itself, in this (fresh, single-threaded) process: its workers are forked, so
    they load with the same `weights_only` allowances."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    multiprocessing.set_start_method("fork", force=True)
    args = argparse.Namespace(
        input_folder=checkpoint, output_folder=out, num_extract_workers=workers,
        num_merge_workers=max(1, workers // 4), keep_temp_folder=False, strict=True, inject_missing_state=False,
    )  # fmt: skip
    with weights_only_loads():
        ds_to_universal(args)


if __name__ == "__main__":  # CHECKPOINT OUT WORKERS
    _convert(sys.argv[1], sys.argv[2], int(sys.argv[3]))
