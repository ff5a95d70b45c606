"""The compact sample index of one shard: one fixed-size record per usable sample, memory-mapped.

`sora-prep` writes it beside each shard it finishes (`NAME.tar` -> `NAME.idx`; `sora-prep index`
adds it to shards made elsewhere), and the loader keeps the same format for the shards it has to
scan itself, in its cache. A corpus of 100M samples is then 39 bytes per sample on disk; in
memory, once indexed, each sample costs the 2 bytes of the bucket it falls in.

Layout of the file:
  - 8 bytes: `MAGIC`;
  - 8 bytes: the length of the JSON header, little-endian;
  - the JSON header, padded with spaces to a multiple of 8 bytes: `version`, `tar_bytes` (the
    size of the shard it describes), `samples`, `corrupt` (why the shard's scan stopped early, or
    null), `rejected` (samples unusable from their metadata, by reason), `latent_buckets` (names
    the `latent_bucket` codes stand for), `probe` (CRC-32 of the shard's tar header blocks where
    its first and last samples start) and `crc32` (of the rest of the header and the records);
  - `samples` records of dtype `RECORD`.
A file that does not follow this, whose checksum or values disagree, whose `tar_bytes` is not
the shard's size, or whose probe does not match the shard's bytes is not used: the shard is
scanned instead.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"SORAIDX\x01"
VERSION = 1
KINDS = ("video", "image", "latent")  # the `kind` code is the position in this tuple
RECORD = np.dtype(
    [
        ("start", "<i8"),  # the sample's first tar header, in bytes from the shard's start
        ("length", "<i8"),  # bytes up to the end of its last member
        ("width", "<i4"),  # pixels (0 for latents)
        ("height", "<i4"),
        ("frames", "<i4"),  # frames the sample offers (its window's), 1 for an image
        ("fps", "<f8"),  # 0: unknown
        ("kind", "u1"),
        ("latent_bucket", "<i2"),  # index into `latent_buckets`, -1 unless a latent
    ]
)
MAX_HEADER_BYTES = 1 << 20


class SampleIndexInvalid(ValueError):
    """A compact index file that is damaged, foreign, or describes another version of its shard."""


@dataclass(frozen=True)
class SampleIndex:
    """The usable samples of one shard (records in file order) and the counts of the rest."""

    tar_bytes: int
    records: np.ndarray  # (samples,) RECORD; memory-mapped when read from a file
    rejected: dict[str, int]
    checksum: int  # CRC-32 of the header fields and the records
    probe: int  # CRC-32 of the tar header blocks where the first and the last sample start
    corrupt: str | None = None
    latent_buckets: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.records)


def side_index_path(shard: str) -> str:
    """Where sora-prep puts the compact index of a shard: `NAME.tar` -> `NAME.idx`."""
    return shard.removesuffix(".tar") + ".idx"


def from_scan(scan: dict, tar_bytes: int, probe: int) -> SampleIndex:
    """The compact index of a shard from `index.scan_shard`'s records and its probe checksum."""
    usable = [record for record in scan["samples"] if "reason" not in record]
    rejected: dict[str, int] = {}
    for record in scan["samples"]:
        if "reason" in record:
            reason = "unreadable" if record["reason"] == "needs_probe" else record["reason"]
            rejected[reason] = rejected.get(reason, 0) + 1
    names = sorted({record["bucket"] for record in usable if record["kind"] == "latent"})
    records = np.zeros(len(usable), RECORD)
    for row, record in zip(records, usable, strict=True):
        row["start"], row["length"] = record["start"], record["length"]
        row["kind"] = KINDS.index(record["kind"])
        if record["kind"] == "latent":
            row["latent_bucket"] = names.index(record["bucket"])
        else:
            row["latent_bucket"] = -1
            row["width"], row["height"] = record["width"], record["height"]
            row["frames"], row["fps"] = record["frames"], record["fps"]
    header = _header(tar_bytes, len(records), scan["corrupt"], rejected, names, probe)
    return SampleIndex(
        tar_bytes, records, rejected, _checksum(header, records), probe, scan["corrupt"], tuple(names)
    )


def _header(
    tar_bytes: int, samples: int, corrupt: str | None, rejected: dict, names: list, probe: int
) -> dict:
    return {
        "version": VERSION, "tar_bytes": tar_bytes, "samples": samples, "corrupt": corrupt,
        "rejected": rejected, "latent_buckets": list(names), "probe": probe,
    }  # fmt: skip


def _checksum(header: dict, records: np.ndarray) -> int:
    """CRC-32 of the header's canonical JSON (without its checksum) and the records."""
    fields = json.dumps({k: v for k, v in header.items() if k != "crc32"}, sort_keys=True).encode()
    return zlib.crc32(records, zlib.crc32(fields))


def write_sample_index(path: Path, index: SampleIndex) -> None:
    """Write `index` to `path` atomically (a temporary file, flushed, then renamed)."""
    records = np.ascontiguousarray(index.records, RECORD)
    header = _header(
        index.tar_bytes, len(records), index.corrupt, index.rejected, list(index.latent_buckets), index.probe
    )
    text = json.dumps({**header, "crc32": _checksum(header, records)}, sort_keys=True).encode()
    text += b" " * (-len(text) % 8)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    with open(partial, "wb") as stream:
        stream.write(MAGIC + len(text).to_bytes(8, "little") + text)
        stream.write(records.tobytes())
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(partial, path)


def read_sample_index(path: str | Path, tar_bytes: int | None = None) -> SampleIndex:
    """The index in `path`, its records memory-mapped; raises SampleIndexInvalid when the file is
    damaged or (given `tar_bytes`, the shard's current size) describes another version of the shard.
    The probe is checked against the shard by the caller, which can read it."""
    try:
        with open(path, "rb") as stream:
            prefix = stream.read(16)
            if len(prefix) < 16 or prefix[:8] != MAGIC:
                raise SampleIndexInvalid(f"{path}: not a sample index")
            length = int.from_bytes(prefix[8:], "little")
            if length > MAX_HEADER_BYTES:
                raise SampleIndexInvalid(f"{path}: a header of {length} bytes")
            header = json.loads(stream.read(length))
            size = os.fstat(stream.fileno()).st_size
    except (OSError, ValueError) as error:  # includes a header that is not JSON
        raise SampleIndexInvalid(f"{path}: {error}") from error
    samples = _checked_header(path, header, tar_bytes)
    if size != 16 + length + samples * RECORD.itemsize:
        raise SampleIndexInvalid(f"{path}: {size} bytes, not the {samples} records its header says")
    records = (
        np.memmap(path, RECORD, "r", offset=16 + length, shape=(samples,)) if samples else np.zeros(0, RECORD)
    )
    if _checksum(header, records) != header["crc32"]:
        raise SampleIndexInvalid(f"{path}: its contents do not match their checksum")
    index = SampleIndex(
        header["tar_bytes"], records, header["rejected"], header["crc32"], header["probe"], header["corrupt"],
        tuple(header["latent_buckets"]),
    )  # fmt: skip
    _check_records(path, index)
    return index


def _checked_header(path: str | Path, header: object, tar_bytes: int | None) -> int:
    """The header's sample count, once every field has its type; raises SampleIndexInvalid."""
    fields = {
        "version": int, "tar_bytes": int, "samples": int, "corrupt": (str, type(None)),
        "rejected": dict, "latent_buckets": list, "probe": int, "crc32": int,
    }  # fmt: skip
    if not isinstance(header, dict) or any(not isinstance(header.get(k), t) for k, t in fields.items()):
        raise SampleIndexInvalid(f"{path}: a header without the fields of version {VERSION}")
    if header["version"] != VERSION:
        raise SampleIndexInvalid(f"{path}: version {header['version']}, not {VERSION}")
    if tar_bytes is not None and header["tar_bytes"] != tar_bytes:
        raise SampleIndexInvalid(f"{path}: made for a shard of {header['tar_bytes']} bytes, not {tar_bytes}")
    rejected, names = header["rejected"], header["latent_buckets"]
    if any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in rejected.values()):
        raise SampleIndexInvalid(f"{path}: rejected counts are not counts")
    if any(not isinstance(name, str) for name in names) or header["samples"] < 0:
        raise SampleIndexInvalid(f"{path}: malformed header")
    return header["samples"]


def _check_records(path: str | Path, index: SampleIndex) -> None:
    """Every record inside the shard, with a known kind and positive sizes (raises SampleIndexInvalid)."""
    r = index.records
    if not len(r):
        return
    latent = r["kind"] == KINDS.index("latent")
    media_ok = (
        (r["width"] > 0) & (r["height"] > 0) & (r["frames"] > 0) & np.isfinite(r["fps"]) & (r["fps"] >= 0)
    )
    ok = (
        (r["start"] >= 0)
        & (r["length"] > 0)
        & (r["start"] + r["length"] <= index.tar_bytes)
        & (r["kind"] < len(KINDS))
        & np.where(
            latent, (r["latent_bucket"] >= 0) & (r["latent_bucket"] < len(index.latent_buckets)), media_ok
        )
    )
    if not ok.all():
        raise SampleIndexInvalid(
            f"{path}: record {int(np.argmin(ok))} lies outside its shard or is malformed"
        )
