"""Where shard bytes come from: local files, object stores, and (only when allowed) pipes.

A shard source is one of
  - a directory of `*.tar` files, a single `.tar`, or a brace pattern
    (`/data/train/shard-{000000..000127}.tar`);
  - an object-store URL with any scheme fsspec knows (`s3://bucket/train/shard-{0000..0099}.tar`,
    `gs://...`, `memory://...`; install the store's fsspec backend, e.g. s3fs or gcsfs). Samples
    are read with byte-range requests, so no shard is downloaded whole;
  - `pipe:COMMAND`, which runs COMMAND in a shell and reads the tar from its standard output.
    Only accepted when the run allows it (`data.allow_pipe=true`), and copied once into the
    local cache directory, because samples are read by byte range.

Nothing here runs a shell unless a `pipe:` source was explicitly allowed.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
from pathlib import Path
from typing import BinaryIO

import braceexpand

PIPE = "pipe:"


class ShardError(ValueError):
    """A shard source that cannot be used (missing, empty, or not allowed)."""


def is_remote(url: str) -> bool:
    """A URL with a scheme other than file:// (read through fsspec)."""
    return "://" in url and not url.startswith("file://")


def _local(url: str) -> str:
    return url.removeprefix("file://")


def filesystem_of(url: str):
    """The fsspec file system of an object-store URL."""
    import fsspec

    filesystem, _ = fsspec.core.url_to_fs(url)
    return filesystem


def resolve_shards(source: str, allow_pipe: bool = False) -> list[str]:
    """Expand a shard source into a sorted list of shard URLs; raises ShardError if there are none.

    A `pipe:` URL only ever comes from the source string itself, and only with `allow_pipe`: a
    file listed from a directory is named by its path inside it (`./pipe:x.tar`, never `pipe:x.tar`).
    """
    paths = list(braceexpand.braceexpand(source)) if "{" in source else [source]
    if any(path.startswith(PIPE) for path in paths):
        if not allow_pipe:
            raise ShardError(f"{source}: pipe: sources run a shell; set data.allow_pipe=true to accept them")
        if not all(path.startswith(PIPE) for path in paths):
            raise ShardError(f"{source}: a source is either all pipe: commands or none")
        return paths
    if is_remote(source):
        return _resolve_remote(source, paths)
    paths = [_local(p) for p in paths]
    if "{" in source:
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise ShardError(
                f"{source}: {len(missing)} of {len(paths)} shards are missing, e.g. {missing[0]}"
            )
    elif Path(paths[0]).is_dir():  # os.path.join keeps "./": a listed name never reads as a URL
        paths = [os.path.join(paths[0], p.name) for p in Path(paths[0]).glob("*.tar")]
    elif not Path(paths[0]).is_file():
        raise ShardError(f"{source}: no such file or directory")
    if not paths:
        raise ShardError(f"{source}: no .tar shards found")
    return sorted(paths)


def _resolve_remote(source: str, paths: list[str]) -> list[str]:
    filesystem = filesystem_of(source)
    protocol = source.split("://", 1)[0]
    if "{" not in source and filesystem.isdir(source):
        found = [p for p in filesystem.ls(source, detail=False) if p.endswith(".tar")]
        paths = [p if "://" in p else f"{protocol}://{p.lstrip('/')}" for p in found]
    missing = [p for p in paths if not filesystem.isfile(p)]
    if missing:
        raise ShardError(f"{source}: {len(missing)} of {len(paths)} shards are missing, e.g. {missing[0]}")
    if not paths:
        raise ShardError(f"{source}: no .tar shards found")
    return sorted(paths)


def open_shard(url: str) -> BinaryIO:
    """A seekable binary file for a local path or an object-store URL (not for pipe: URLs)."""
    if is_remote(url):
        return filesystem_of(url).open(url, "rb")
    return open(_local(url), "rb")


OPEN_SHARDS = 16  # local shard files a process keeps open between reads


@functools.lru_cache(maxsize=OPEN_SHARDS)
def _open_local(path: str) -> BinaryIO:
    return open(path, "rb", buffering=0)


def read_range(url: str, start: int, length: int) -> bytes:
    """`length` bytes of a shard from offset `start` (one ranged request for an object store)."""
    if is_remote(url):
        return filesystem_of(url).cat_file(url, start=start, end=start + length)
    data = os.pread(_open_local(_local(url)).fileno(), length, start)
    if len(data) != length:
        raise OSError(f"{url}: wanted {length} bytes at {start}, the file ends after {len(data)}")
    return data


def shard_signature(url: str) -> str:
    """Changes whenever the shard's content may have: size and modification time (or ETag)."""
    if url.startswith(PIPE):
        return "pipe"
    if is_remote(url):
        info = filesystem_of(url).info(url)
        stamp = (
            info.get("ETag")
            or info.get("etag")
            or info.get("mtime")
            or info.get("LastModified")
            or info.get("created")
        )
        return f"{info.get('size')}:{stamp}"
    stat = os.stat(_local(url))
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def materialize_pipe(url: str, cache_dir: Path) -> str:
    """Run a `pipe:` source once and keep its output under `cache_dir`; returns the local path."""
    command = url.removeprefix(PIPE)
    target = cache_dir / "pipe" / (hashlib.sha1(command.encode()).hexdigest() + ".tar")
    if target.is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    with open(partial, "wb") as out:
        result = subprocess.run(command, shell=True, stdout=out, stderr=subprocess.PIPE, check=False)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise ShardError(
            f"{url}: exited with {result.returncode}: {result.stderr.decode(errors='replace')[-300:]}"
        )
    partial.replace(target)
    return str(target)
