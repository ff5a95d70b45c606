"""A checkpoint's manifest: every file it holds, with its size and BLAKE2b digest.

The manifest is written last, after every rank's files are on disk (fsynced); a directory
whose files do not match it, or that holds files it does not list, is not a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_CHUNK = 8 << 20


class CheckpointInvalid(ValueError):
    """A checkpoint directory that is torn, corrupted or not ours; the message says which file and how."""


def file_digest(path: Path) -> str:
    """BLAKE2b-128 of a file's bytes, as hex."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb", buffering=0) as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def list_files(directory: Path) -> list[str]:
    """Every regular file under `directory` except the manifest, as sorted relative POSIX paths."""
    return sorted(
        path.relative_to(directory).as_posix()
        for path in directory.rglob("*")
        if path.is_file() and path.name != MANIFEST
    )


def describe_files(directory: Path, names: list[str]) -> dict[str, dict]:
    """Flush each file to disk and record its size and digest: {name: {"bytes", "blake2b"}}."""
    entries = {}
    for name in names:
        path = directory / name
        fsync_path(path)
        entries[name] = {"bytes": path.stat().st_size, "blake2b": file_digest(path)}
    return entries


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
        raise CheckpointInvalid(f"{directory.name}: no {MANIFEST} (the save did not finish)") from None
    except (OSError, ValueError) as error:
        raise CheckpointInvalid(f"{directory.name}: unreadable {MANIFEST} ({error})") from None
    if document.get("version") != MANIFEST_VERSION or not isinstance(document.get("files"), dict):
        raise CheckpointInvalid(f"{directory.name}: {MANIFEST} is not a version {MANIFEST_VERSION} manifest")
    return document


def file_problems(directory: Path, manifest: dict, names: list[str], deep: bool) -> list[str]:
    """What is wrong with the listed files `names` of a checkpoint: missing, wrong size, or
    (when `deep`) wrong digest. An empty list means they all match."""
    problems = []
    for name in names:
        expected, path = manifest["files"][name], directory / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != expected["bytes"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, the manifest says {expected['bytes']}")
        elif deep and file_digest(path) != expected["blake2b"]:
            problems.append(f"{name} does not match its digest (corrupted)")
    return problems


def unlisted_files(directory: Path, manifest: dict) -> list[str]:
    """Files in the directory that the manifest does not list (a checkpoint holds nothing else)."""
    return [name for name in list_files(directory) if name not in manifest["files"]]
