"""Write tar shards and JSON files so that a reader never sees a partial one.

A shard is streamed into `NAME.partial`, flushed to disk, then renamed to `NAME`, and its compact
sample index (`NAME.idx`, see `sample_index.py`) written beside it: a crash leaves at most a
`.partial` file, which a rerun overwrites, or a shard without its index, which the loader scans. Tar members carry a fixed mtime and owner, so the
same samples always give the same bytes. Used by the synthetic corpus (`sora_train.data.synthetic`)
and by `sora-prep shards` and `sora-prep encode`.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

from .index import write_side_index
from .sample_index import side_index_path

TAR_MTIME = 0  # constant member mtime and owner: byte-identical shards for identical samples


def index_path(shard: Path) -> Path:
    """The `.index.json` written beside a finished shard (its presence marks the shard done)."""
    return shard.with_name(shard.name.removesuffix(".tar") + ".index.json")


def sample_bytes(sample: dict[str, str | bytes]) -> int:
    """Payload bytes of a sample (its members, without the key)."""
    return sum(len(v) for k, v in sample.items() if k != "__key__")


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
        self._tar = tarfile.open(self.partial, mode="w", format=tarfile.GNU_FORMAT)  # noqa: SIM115
        self.samples = 0
        self.bytes = 0

    def add(self, sample: dict[str, str | bytes]) -> None:
        """Append one sample: `__key__` plus extension -> bytes (members in sorted extension order)."""
        key = sample["__key__"]
        for extension in sorted(k for k in sample if k != "__key__"):
            data = sample[extension]
            data = data.encode("utf-8") if isinstance(data, str) else data
            member = tarfile.TarInfo(f"{key}.{extension}")
            member.size, member.mtime, member.mode = len(data), TAR_MTIME, 0o444
            member.uname = member.gname = "sora"
            self._tar.addfile(member, io.BytesIO(data))
        self.samples += 1
        self.bytes += sample_bytes(sample)

    def commit(self) -> None:
        """Close, flush to disk, move into place under the final name, and write the shard's compact
        sample index beside it (an older index is removed first, so none ever describes other bytes)."""
        self._tar.close()
        with open(self.partial, "rb+") as stream:
            os.fsync(stream.fileno())
        Path(side_index_path(str(self.path))).unlink(missing_ok=True)
        os.replace(self.partial, self.path)
        write_side_index(self.path)

    def discard(self) -> None:
        """Close and delete the partial file."""
        self._tar.close()
        self.partial.unlink(missing_ok=True)


def remove_shard(path: Path) -> None:
    """Delete a shard and its compact sample index."""
    Path(side_index_path(str(path))).unlink(missing_ok=True)
    path.unlink(missing_ok=True)


def write_shard(path: Path, samples: list[dict[str, str | bytes]]) -> None:
    """Write a whole shard atomically."""
    shard = ShardFile(path)
    for sample in samples:
        shard.add(sample)
    shard.commit()
