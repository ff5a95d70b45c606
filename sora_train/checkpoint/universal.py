"""Converting a ZeRO checkpoint for a different number of data-parallel ranks.

DeepSpeed's universal checkpoint stores each parameter's fp32 weights and optimizer moments
whole, so any number of ranks can partition them again. The conversion runs once, on rank 0,
into the resuming run's RUN_DIR/checkpoints/step_XXXXXXX.universal/, and is reused by later
resumes of the same checkpoint (the same path and manifest).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import zlib
from pathlib import Path

from .manifest import MANIFEST, fsync_path
from .safe_load import weights_only_loads

UNIVERSAL_INFO = {"universal_checkpoint_version": 0.4}  # written into every save, so any save converts
_DONE = ".converted"


def convert_to_universal(checkpoint: Path, out: Path) -> Path:
    """Write the universal form of `checkpoint` to `out` (skipped when one of the same checkpoint is there).

    The source files are read with `weights_only` loads; the result appears in one rename.
    """
    source = f"{checkpoint.resolve()}\n{zlib.crc32((checkpoint / MANIFEST).read_bytes()):08x}\n"
    if (out / _DONE).is_file() and (out / _DONE).read_text() == source:
        return out
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(checkpoint), output_folder=str(partial), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=False,
    )  # fmt: skip
    with (
        weights_only_loads(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        ds_to_universal(args)
    (out.parent / "latest_universal").unlink(missing_ok=True)  # a pointer to the .partial name
    (partial / _DONE).write_text(source)
    os.replace(partial, out)
    fsync_path(out.parent)
    return out
