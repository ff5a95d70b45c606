"""The sample index of a shard set: where each sample's bytes are and what shape it has.

One pass over each tar reads its headers and small metadata members (json, txt), never a video:
a sample is the run of consecutive members sharing a key, located by its byte range in the
shard, described by its kind (video, image, latent), size, frame count, fps and frame window.
A sample that is unusable from its metadata alone is recorded with the reason. Scans are cached
per shard (keyed by path, size and modification time), so a restart re-reads nothing.
Videos whose json lacks width/height/num_frames are probed with PyAV (headers only).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from webdataset.tariterators import base_plus_ext

from .decode import SkipSample
from .metadata import video_fields
from .shards import read_captioned
from .storage import PIPE, ShardError, materialize_pipe, open_shard, shard_signature

INDEX_VERSION = 2
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
    return {"version": INDEX_VERSION, "samples": samples, "corrupt": corrupt}


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
    return cache_dir / "index" / f"{name}.json"


def cached_scan(url: str, cache_dir: Path) -> tuple[str, dict]:
    """(readable location, scan) of one shard, from the cache when the shard has not changed."""
    location = materialize_pipe(url, cache_dir) if url.startswith(PIPE) else url
    path = scan_cache_path(url, location, cache_dir)
    if path.is_file():
        try:
            scan = json.loads(path.read_text(encoding="utf-8"))
            if scan.get("version") == INDEX_VERSION:
                return location, scan
        except (OSError, ValueError):
            pass  # an unreadable cache entry is rebuilt
    scan = scan_with_retries(location)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(scan), encoding="utf-8")
    partial.replace(path)
    return location, scan


@dataclass
class ShardSetIndex:
    """Every sample of a shard set, in shard order then file order.

    Arrays are (N,) and aligned: `shard` indexes `locations`; `start` / `length` are the
    sample's bytes in that shard; `records` keep the metadata used to place samples in buckets
    (the loader drops them once it has, so a large corpus costs ~20 bytes per sample).
    `rejected` counts samples unusable from their metadata, by reason, and `corrupt_shards`
    the shards that ended early or were damaged.
    """

    urls: list[str]
    locations: list[str]
    shard: np.ndarray
    start: np.ndarray
    length: np.ndarray
    records: list[dict]
    rejected: Counter
    corrupt_shards: int

    def __len__(self) -> int:
        return len(self.start)


def build_index(urls: list[str], cache_dir: Path | None = None) -> ShardSetIndex:
    """Scan (or read from cache) every shard of a set; rejected samples are counted, not kept."""
    cache_dir = cache_dir or default_cache_dir()
    locations, shards, starts, lengths, records = [], [], [], [], []
    rejected: Counter = Counter()
    corrupt = 0
    for shard_id, url in enumerate(urls):
        location, scan = cached_scan(url, cache_dir)
        locations.append(location)
        corrupt += scan["corrupt"] is not None
        for record in scan["samples"]:
            if "reason" in record:
                rejected["unreadable" if record["reason"] == "needs_probe" else record["reason"]] += 1
                continue
            shards.append(shard_id)
            starts.append(record["start"])
            lengths.append(record["length"])
            records.append(record)
    return ShardSetIndex(
        urls, locations, np.asarray(shards, np.int32), np.asarray(starts, np.int64),
        np.asarray(lengths, np.int64), records, rejected, corrupt,
    )  # fmt: skip
