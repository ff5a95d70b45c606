"""The sample index of a shard set: where each usable sample's bytes are and what shape it has.

Each shard's samples are described by a compact index (`sample_index.py`): the one sora-prep
wrote beside the shard when it is sound and describes this version of it, else one built here by
scanning the tar and cached (keyed by path, size and modification time), so a restart re-reads
nothing. A scan is one pass over the tar's headers and small metadata members (json, txt), never
a video: a sample is the run of consecutive members sharing a key, located by its byte range in
the shard, described by its kind (video, image, latent), size, frame count, fps and frame window.
A sample unusable from its metadata alone is counted by reason. Videos whose json lacks
width/height/num_frames are probed with PyAV (headers only).
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import sys
import tarfile
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from webdataset.tariterators import base_plus_ext

from .decode import SkipSample
from .metadata import video_fields
from .sample_index import (
    SampleIndex,
    SampleIndexInvalid,
    from_scan,
    read_sample_index,
    side_index_path,
    write_sample_index,
)
from .shards import read_captioned
from .storage import (
    PIPE,
    ShardError,
    filesystem_of,
    is_remote,
    materialize_pipe,
    open_shard,
    read_range,
    shard_signature,
)

VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "mov", "avi")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
LATENT_MEMBER = "latent.npy"
METADATA_MEMBERS = ("json", "txt")  # read while scanning; everything else only by the decoder


def default_cache_dir() -> Path:
    """$SORA_CACHE_DIR or ~/.cache/sora_train."""
    return Path(os.environ.get("SORA_CACHE_DIR", Path.home() / ".cache" / "sora_train"))


def member_kind(extensions: set[str]) -> str | None:
    """video | image | latent | None, from the member extensions of one sample."""
    if LATENT_MEMBER in extensions:
        return "latent"
    if extensions & set(VIDEO_EXTENSIONS):
        return "video"
    if extensions & set(IMAGE_EXTENSIONS):
        return "image"
    return None


def describe(key: str, members: dict[str, bytes | None], media: bytes | None = None) -> dict:
    """The index record of one sample from its metadata members: kind, shape, or a `reason`.

    `media` are the bytes of the image or video member, read only when the json does not give
    the size (images: header only; videos: container probe).
    """
    record: dict = {"key": key}
    kind = member_kind(set(members))
    if kind is None:
        return {**record, "reason": "missing_video"}
    record["kind"] = kind
    try:
        meta, _ = read_captioned({name: members[name] for name in METADATA_MEMBERS if name in members})
    except SkipSample as skip:
        return {**record, "reason": skip.reason}
    if kind == "latent":
        if not isinstance(meta.get("bucket"), str):
            return {**record, "reason": "bad_metadata"}
        return {**record, "bucket": meta["bucket"]}
    try:
        fields = video_fields(meta)
    except SkipSample as skip:
        return {**record, "reason": skip.reason}
    frames = 1 if kind == "image" else fields.clip_frames
    width, height, fps = fields.width, fields.height, fields.fps
    if width is None or height is None or frames is None:
        if media is None:
            return {**record, "reason": "needs_probe"}
        try:
            width, height, source_frames, fps = probe_media(kind, media)
        except Exception:
            return {**record, "reason": "unreadable"}
        frames = replace(fields, num_frames=source_frames).clip_frames
    if width <= 0 or height <= 0 or frames <= 0:
        return {**record, "reason": "bad_metadata"}
    return {**record, "width": width, "height": height, "frames": frames, "fps": fps}


def probe_media(kind: str, data: bytes) -> tuple[int, int, int, float]:
    """(width, height, frames, fps) from an image's header or a video container's headers."""
    if kind == "image":
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            return image.width, image.height, 1, 0.0
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or 0.0)
        return stream.codec_context.width, stream.codec_context.height, int(stream.frames), fps


def scan_shard(location: str) -> dict:
    """Index records of one tar: [{key, start, length, kind, width, height, frames, fps} | {..., reason}].

    A tar that ends early or is corrupt keeps the samples read before the damage; the index
    says so under `corrupt`.
    """
    samples: list[dict] = []
    corrupt = None
    with open_shard(location) as stream:
        size = stream.seek(0, io.SEEK_END)
        stream.seek(0)
        current: dict | None = None

        def finish() -> None:
            if current is None:
                return
            members = current["members"]
            media_name = next((e for e in (*VIDEO_EXTENSIONS, *IMAGE_EXTENSIONS) if e in members), None)
            record = describe(current["key"], {e: members[e][2] for e in members})
            if record.get("reason") == "needs_probe" and media_name is not None:
                offset, length, _ = members[media_name]
                stream.seek(offset)
                record = describe(current["key"], {e: members[e][2] for e in members}, stream.read(length))
            samples.append({**record, "start": current["start"], "length": current["end"] - current["start"]})

        try:
            with tarfile.open(fileobj=stream, mode="r:") as tar:
                for info in tar:
                    if not info.isreg():
                        continue
                    end = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE  # padded
                    if info.offset_data + info.size > size:  # torn: its sample is dropped
                        corrupt, current = f"member {info.name} ends after the file", None
                        break
                    prefix, extension = base_plus_ext(info.name)
                    if prefix is None:
                        continue
                    if current is None or current["key"] != prefix:
                        finish()
                        current = {"key": prefix, "start": info.offset, "end": min(end, size), "members": {}}
                    data = tar.extractfile(info).read() if extension.lower() in METADATA_MEMBERS else None
                    current["members"][extension.lower()] = (info.offset_data, info.size, data)
                    current["end"] = min(end, size)
        except (tarfile.TarError, EOFError) as error:  # damage; a failed read (OSError) is not
            corrupt, current = str(error) or type(error).__name__, None  # the sample in progress may be torn
        finish()
    return {"samples": samples, "corrupt": corrupt}


READ_ATTEMPTS = 4  # scans of a shard whose reads fail before it counts as unreadable
RETRY_WAIT = 0.5  # seconds before the second attempt, doubling after each


def scan_with_retries(location: str, attempts: int = READ_ATTEMPTS, wait: float = RETRY_WAIT) -> dict:
    """`scan_shard`, again after a failed read (an object store's throttle, a network file system's
    hiccup), with exponential backoff. A shard still unreadable after `attempts` raises ShardError
    naming it: a read error is never taken for damage, so it is never cached as a truncated shard."""
    for attempt in range(attempts - 1):
        try:
            return scan_shard(location)
        except OSError:
            time.sleep(wait * 2**attempt)
    try:
        return scan_shard(location)
    except OSError as error:
        raise ShardError(f"{location}: unreadable after {attempts} attempts: {error}") from error


def scan_cache_path(url: str, location: str, cache_dir: Path) -> Path:
    """Where the scan of a shard is cached: named by its URL and its current size and time stamp."""
    name = hashlib.sha1(f"{url}|{shard_signature(location)}".encode()).hexdigest()
    return cache_dir / "index" / f"{name}.idx"


def shard_bytes(location: str) -> int:
    """The size of a local or object-store shard."""
    if is_remote(location):
        return int(filesystem_of(location).info(location)["size"])
    return os.stat(location.removeprefix("file://")).st_size


PROBE_BYTES = tarfile.BLOCKSIZE  # a tar header block


def probe_checksum(location: str, starts: np.ndarray) -> int:
    """CRC-32 of the shard's tar header blocks where its first and its last sample start: an index
    made for other bytes of the same size finds other headers there."""
    crc = 0
    for offset in sorted({int(starts[0]), int(starts[-1])}) if len(starts) else []:
        crc = zlib.crc32(read_range(location, offset, PROBE_BYTES), crc)
    return crc


def check_probe(location: str, side: str, index: SampleIndex) -> None:
    """Raise SampleIndexInvalid when the shard's bytes where the index says its first and last
    samples start are not the ones it was made from."""
    try:
        matches = probe_checksum(location, index.records["start"]) == index.probe
    except OSError as error:  # a sample said to start too near the end to hold a header
        raise SampleIndexInvalid(f"{side}: {error}") from error
    if not matches:
        raise SampleIndexInvalid(f"{side}: its shard's bytes changed since the index was made")


def compact_index(location: str, scan: dict, tar_bytes: int) -> SampleIndex:
    """The compact index of a scanned shard."""
    starts = np.asarray([record["start"] for record in scan["samples"] if "reason" not in record], np.int64)
    return from_scan(scan, tar_bytes, probe_checksum(location, starts))


def cached_scan(url: str, cache_dir: Path) -> tuple[str, str, SampleIndex]:
    """(readable location, index file, compact index) of a shard scanned here, from the cache when
    the shard has not changed."""
    location = materialize_pipe(url, cache_dir) if url.startswith(PIPE) else url
    path = scan_cache_path(url, location, cache_dir)
    tar_bytes = shard_bytes(location)
    if path.is_file():
        try:
            return location, str(path), read_sample_index(path, tar_bytes)
        except SampleIndexInvalid:
            pass  # an unreadable cache entry is rebuilt
    path.parent.mkdir(parents=True, exist_ok=True)
    write_sample_index(path, compact_index(location, scan_with_retries(location), tar_bytes))
    return location, str(path), read_sample_index(path, tar_bytes)


def side_index(url: str, cache_dir: Path) -> str | None:
    """The readable path of the compact index sora-prep wrote beside a shard, if there is one (an
    object store's is copied into the cache once per version of the shard)."""
    if url.startswith(PIPE):
        return None
    side = side_index_path(url)
    if not is_remote(url):
        side = side.removeprefix("file://")
        return side if os.path.isfile(side) else None
    filesystem = filesystem_of(url)
    if not filesystem.isfile(side):
        return None
    copy = scan_cache_path(side, url, cache_dir).with_suffix(".side.idx")
    if not copy.is_file():
        copy.parent.mkdir(parents=True, exist_ok=True)
        partial = copy.with_name(f"{copy.name}.{os.getpid()}.partial")
        partial.write_bytes(filesystem.cat_file(side))
        partial.replace(copy)
    return str(copy)


def shard_index(url: str, cache_dir: Path) -> tuple[str, str, SampleIndex]:
    """(readable location, index file, compact index) of one shard: the index beside it when it is
    sound and describes this version of the shard, else a scan (cached)."""
    side = side_index(url, cache_dir)
    if side is not None:
        try:
            return url, side, verified_side_index(url, side, cache_dir)
        except SampleIndexInvalid as problem:
            print(f"warning: scanning the shard instead of using its index: {problem}", file=sys.stderr)
    return cached_scan(url, cache_dir)


def verified_side_index(url: str, side: str, cache_dir: Path) -> SampleIndex:
    """The index beside a shard once it is sound and its probe matches the shard's bytes (checked
    once per version of the shard: a marker in the cache remembers it)."""
    index = read_sample_index(side, shard_bytes(url))
    marker = scan_cache_path(url, url, cache_dir).with_suffix(".verified")
    try:
        if marker.read_text() == str(index.checksum):
            return index
    except OSError:
        pass
    check_probe(url, side, index)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(index.checksum))
    return index


def write_side_index(shard: Path) -> SampleIndex:
    """Scan a finished local shard and write its compact index beside it (`NAME.idx`)."""
    index = compact_index(str(shard), scan_with_retries(str(shard)), shard.stat().st_size)
    write_sample_index(Path(side_index_path(str(shard))), index)
    return index


@functools.lru_cache(maxsize=16)
def open_sample_index(path: str, tar_bytes: int) -> SampleIndex:
    """A shard's compact index, kept open for the next samples of the same shard."""
    return read_sample_index(path, tar_bytes)


@dataclass
class ShardSetIndex:
    """Where every usable sample of a shard set is, in shard order then file order.

    Shard s holds samples `bounds[s]:bounds[s + 1]`; each shard's records stay in its compact
    index file, read again (memory-mapped) only for the samples a batch needs. `rejected` counts
    samples unusable from their metadata, by reason, and `corrupt_shards` the shards that ended
    early or were damaged.
    """

    urls: list[str]
    locations: list[str] = field(default_factory=list)
    index_files: list[str] = field(default_factory=list)
    tar_bytes: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    rejected: Counter = field(default_factory=Counter)
    corrupt_shards: int = 0

    def add(self, location: str, index_file: str, index: SampleIndex) -> None:
        """Append the next shard."""
        self.locations.append(location)
        self.index_files.append(index_file)
        self.tar_bytes.append(index.tar_bytes)
        self.sizes.append(len(index))
        self.rejected.update(index.rejected)
        self.corrupt_shards += index.corrupt is not None

    @functools.cached_property
    def bounds(self) -> np.ndarray:
        """(shards + 1,) int64: the first sample of each shard, then the number of samples."""
        return np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)])

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def sample_range(self, sample: int) -> tuple[str, int, int]:
        """(shard location, first byte, length) of a sample."""
        shard = int(np.searchsorted(self.bounds, sample, "right")) - 1
        records = open_sample_index(self.index_files[shard], self.tar_bytes[shard]).records
        if len(records) != self.sizes[shard]:
            raise ShardError(f"{self.urls[shard]}: its index changed while the run was reading it")
        row = records[sample - self.bounds[shard]]
        return self.locations[shard], int(row["start"]), int(row["length"])


def shard_indexes(urls: list[str], cache_dir: Path | None = None) -> Iterator[tuple[str, str, SampleIndex]]:
    """(location, index file, compact index) of every shard of a set, in order (see `shard_index`)."""
    cache_dir = cache_dir or default_cache_dir()
    for url in urls:
        yield shard_index(url, cache_dir)


def build_index(urls: list[str], cache_dir: Path | None = None) -> ShardSetIndex:
    """The index of a shard set, from the shards' compact indexes (or scans, cached)."""
    index = ShardSetIndex(urls)
    for location, index_file, shard in shard_indexes(urls, cache_dir):
        index.add(location, index_file, shard)
    return index
