"""`sora-prep index`: write the compact sample index beside shards made elsewhere.

`sora-prep shards` and `encode` write `NAME.idx` beside every shard they finish. Shards built by
other tools get theirs here, once: one pass over each tar's headers and small metadata members.
A shard whose index is sound and describes its current bytes is left alone unless forced.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from sora_train.data.index import check_probe, write_side_index
from sora_train.data.sample_index import SampleIndexInvalid, read_sample_index, side_index_path
from sora_train.data.storage import ShardError, is_remote, resolve_shards


def index_one(shard: str, force: bool = False) -> tuple[bool, int]:
    """(whether an index was written, usable samples) for one local shard."""
    if not force:
        side = side_index_path(shard)
        try:
            index = read_sample_index(side, Path(shard).stat().st_size)
            check_probe(shard, side, index)
            return False, len(index)
        except SampleIndexInvalid:
            pass  # missing, damaged or stale: written again
    return True, len(write_side_index(Path(shard)))


def index_shards(source: str, force: bool = False, workers: int = 1) -> dict[str, int]:
    """Index every shard of a local source (a directory, a .tar or a brace pattern); returns counts
    of shards `written` and `current` (already indexed) and their usable `samples`."""
    if is_remote(source) or source.startswith("pipe:"):
        raise ShardError(f"{source}: indexes are written beside local shards; copy the index files up after")
    shards = resolve_shards(source)
    with ProcessPoolExecutor(max(1, workers)) as pool:
        results = list(pool.map(index_one, shards, [force] * len(shards), chunksize=8))
    written = sum(done for done, _ in results)
    return {"written": written, "current": len(results) - written, "samples": sum(n for _, n in results)}
