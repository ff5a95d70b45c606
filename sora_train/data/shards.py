"""Reading samples out of local shards in file order, and their members, without unpickling.

Used by data preparation and evaluation (the training loader reads by byte range instead). A
sample is the dict webdataset groups from the members sharing a key:
{"__key__": str, "mp4": bytes, "json": bytes, ...}.
"""

from __future__ import annotations

import functools
import io
import json
import math
from collections.abc import Iterator

import numpy as np
from webdataset.tariterators import group_by_keys, tar_file_expander

from .decode import SkipSample
from .storage import resolve_shards


def iter_shard(path: str) -> Iterator[dict]:
    """Samples of one tar shard, in file order. Raises on a corrupt tar (the caller counts it)."""
    with open(path, "rb") as stream:
        members = tar_file_expander([{"url": path, "stream": stream}])
        yield from group_by_keys(members)


def read_metadata(sample: dict) -> dict:
    """The sample's JSON metadata (UTF-8, never pickle); raises ValueError if absent or invalid."""
    if "json" not in sample:
        raise ValueError("no .json member")
    meta = json.loads(sample["json"].decode("utf-8"))
    if not isinstance(meta, dict):
        raise ValueError("json member is not an object")
    return meta


NPY_MAGIC = b"\x93NUMPY"


@functools.lru_cache(maxsize=256)
def _npy_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) of a `.npy` header; headers repeat, so parsing is cached."""
    stream = io.BytesIO(header)
    major, _ = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    return read(stream)


def load_npy(data: bytes) -> np.ndarray:
    """A `.npy` member's bytes -> read-only array view (never unpickles; raises ValueError)."""
    if data[:6] != NPY_MAGIC or len(data) < 10:
        raise ValueError("not a .npy array")
    major = data[6]
    if major not in (1, 2):  # version 3 (utf-8 field names) is rare: numpy parses it
        return np.load(io.BytesIO(data), allow_pickle=False)
    length_bytes = 2 if major == 1 else 4
    header_end = 8 + length_bytes + int.from_bytes(data[8 : 8 + length_bytes], "little")
    shape, fortran, dtype = _npy_header(data[:header_end])
    if dtype.hasobject:
        raise ValueError("object arrays would need unpickling")
    count = math.prod(shape)
    if len(data) - header_end < count * dtype.itemsize:
        raise ValueError(f"array data is {len(data) - header_end} bytes, {count * dtype.itemsize} expected")
    array = np.frombuffer(data, dtype, count, offset=header_end)
    return array.reshape(shape, order="F" if fortran else "C")


def read_captioned(sample: dict) -> tuple[dict, str]:
    """(metadata, caption) of a sample: the json member's caption, else the txt member's text.

    The json member is optional (metadata is then empty); raises SkipSample(bad_metadata |
    missing_caption).
    """
    meta: dict = {}
    if "json" in sample:
        try:
            meta = read_metadata(sample)
        except (ValueError, UnicodeDecodeError, RecursionError) as error:
            raise SkipSample("bad_metadata", str(error)) from error
    caption = meta.get("caption")
    if not (isinstance(caption, str) and caption.strip()):
        caption = (sample.get("txt") or b"").decode("utf-8", errors="replace").strip()
    if not caption:
        raise SkipSample("missing_caption")
    return meta, caption


def read_captions(source: str, limit: int | None = None) -> list[tuple[str, str]]:
    """(key, caption) pairs from a shard source in order, without decoding video."""
    pairs: list[tuple[str, str]] = []
    for path in resolve_shards(source):
        for sample in iter_shard(path):
            caption = read_metadata(sample).get("caption")
            if isinstance(caption, str) and caption.strip():
                pairs.append((sample["__key__"], caption))
            if limit is not None and len(pairs) >= limit:
                return pairs
    return pairs
