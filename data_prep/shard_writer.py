"""Write tar shards and JSON files so that a reader never sees a partial one.

A shard is streamed into `NAME.partial`, flushed to disk, then renamed to `NAME`: a crash leaves at
most a `.partial` file, which a rerun overwrites. Tar members carry a fixed mtime and owner, so the
same samples always give the same bytes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import webdataset as wds

TAR_MTIME = 0  # constant member mtime (and an int, so no PAX header): byte-identical shards


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write `payload` as indented JSON to `path` via a temporary file and a rename."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="utf-8") as stream:
        stream.write(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(partial, path)


class ShardFile:
    """One tar shard being written: `add()` samples, then `commit()` (or `discard()`)."""

    def __init__(self, path: Path):
        self.path = path
        self.partial = path.with_name(path.name + ".partial")
        self._stream = open(self.partial, "wb")  # noqa: SIM115 -- closed by commit() / discard()
        self._writer = wds.TarWriter(self._stream, encoder=False, mtime=TAR_MTIME)
        self.samples = 0
        self.bytes = 0

    def add(self, sample: dict[str, str | bytes]) -> None:
        """Append one sample: `__key__` plus extension -> bytes."""
        self._writer.write(sample)
        self.samples += 1
        self.bytes += sum(len(v) for k, v in sample.items() if k != "__key__")

    def commit(self) -> None:
        """Close, flush to disk and move into place under the final name."""
        self._writer.close()  # also closes the stream
        with open(self.partial, "rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(self.partial, self.path)

    def discard(self) -> None:
        """Close and delete the partial file."""
        self._writer.close()
        self.partial.unlink(missing_ok=True)


def write_shard(path: Path, samples: list[dict[str, str | bytes]]) -> None:
    """Write a whole shard atomically."""
    shard = ShardFile(path)
    for sample in samples:
        shard.add(sample)
    shard.commit()
