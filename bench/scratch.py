"""The benches' working directory: a temporary one, or the user's, cleaned of what the bench wrote."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def scratch_dir(workdir: Path | None, keep: bool, prefix: str, names: list[str]) -> Iterator[Path]:
    """Yield the directory to write into; afterwards delete it (a temporary one) or its `names` (the user's).

    With `keep`, nothing is deleted and the path is printed.
    """
    root = workdir or Path(tempfile.mkdtemp(prefix=prefix))
    root.mkdir(parents=True, exist_ok=True)
    try:
        yield root
    finally:
        if keep:
            print(f"kept {root}")
        elif workdir is None:
            shutil.rmtree(root, ignore_errors=True)
        else:
            for name in names:
                shutil.rmtree(root / name, ignore_errors=True)
