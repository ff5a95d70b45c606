"""A checkpoint's manifest: every file it holds, with its size and CRC-32 checksum.

The manifest is written last, after every rank's files are on disk (fsynced); a directory
whose files do not match it, or that holds files it does not list, is not a checkpoint.
The checksum catches torn and corrupted files (it is not a defence against a forger: that
is the weights-only loading in `safe_load`). CRC-32 runs at several GB/s and releases the
GIL, so files are checked on parallel threads; a cryptographic hash would cost more than
the disk write itself.
"""

from __future__ import annotations

import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
PART_PREFIX = (
    ".part-"  # a rank's share of the manifest during a background commit, never part of a checkpoint
)
_CHUNK = 8 << 20
_THREADS = min(8, os.cpu_count() or 1)


class CheckpointInvalid(ValueError):
    """A checkpoint directory that is torn, corrupted or not ours; the message says which file and how."""


def file_checksum(path: Path) -> str:
    """CRC-32 of a file's bytes, as 8 hex digits."""
    checksum = 0
    with open(path, "rb", buffering=0) as handle:
        while chunk := handle.read(_CHUNK):
            checksum = zlib.crc32(chunk, checksum)
    return f"{checksum:08x}"


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def list_files(directory: Path) -> list[str]:
    """Every regular file under `directory` except the manifest (and its parts), as sorted relative POSIX paths."""
    return sorted(
        path.relative_to(directory).as_posix()
        for path in directory.rglob("*")
        if path.is_file() and path.name != MANIFEST and not path.name.startswith(PART_PREFIX)
    )


def describe_files(directory: Path, names: list[str]) -> dict[str, dict]:
    """Flush each file to disk and record its size and checksum: {name: {"bytes", "crc32"}}."""

    def describe(name: str) -> dict:
        path = directory / name
        fsync_path(path)
        return {"bytes": path.stat().st_size, "crc32": file_checksum(path)}

    with ThreadPoolExecutor(_THREADS) as pool:
        return dict(zip(names, pool.map(describe, names), strict=True))


def write_manifest(directory: Path, files: dict[str, dict], **info: object) -> None:
    """Write MANIFEST (flushed to disk), then flush the directory itself."""
    document = {"version": MANIFEST_VERSION, **info, "files": files}
    path = directory / MANIFEST
    with open(path, "w") as handle:
        handle.write(json.dumps(document, indent=1, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    fsync_path(directory)


def read_manifest(directory: Path) -> dict:
    """The manifest of a checkpoint directory; CheckpointInvalid when it is missing or unreadable."""
    path = directory / MANIFEST
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointInvalid(f"no {MANIFEST} (the save did not finish)") from None
    except (OSError, ValueError) as error:
        raise CheckpointInvalid(f"unreadable {MANIFEST} ({error})") from None
    if document.get("version") != MANIFEST_VERSION or not isinstance(document.get("files"), dict):
        raise CheckpointInvalid(f"{MANIFEST} is not a version {MANIFEST_VERSION} manifest")
    return document


def file_problems(directory: Path, manifest: dict, names: list[str], deep: bool) -> list[str]:
    """What is wrong with the listed files `names` of a checkpoint: missing, wrong size, or
    (when `deep`) wrong checksum. An empty list means they all match."""

    def problem(name: str) -> str | None:
        expected, path = manifest["files"][name], directory / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {expected['bytes']}"
        if deep and file_checksum(path) != expected["crc32"]:
            return f"{name} does not match its checksum (corrupted)"
        return None

    with ThreadPoolExecutor(_THREADS) as pool:
        return [found for found in pool.map(problem, names) if found]


def unlisted_files(directory: Path, manifest: dict) -> list[str]:
    """Files in the directory that the manifest does not list (a checkpoint holds nothing else)."""
    return [name for name in list_files(directory) if name not in manifest["files"]]
