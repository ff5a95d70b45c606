"""`sora-prep shards`: turn a folder or list of captioned videos into clean webdataset shards.

Input items stream through worker processes (probe, filter, cut; see `probe.py`) and come back
in input order, so the output depends only on the input and the options. Each split is written
in its own pass (train, then val; an item's split is a stable hash of its source name), as
numbered shards `SPLIT/shard-NNNNNN.tar`, each followed by `shard-NNNNNN.index.json`: its
samples' stats, content hashes, the rejects met while filling it, and the input position where
the next shard starts. A shard counts as done once its index exists; a rerun of the same command
keeps the done shards, rebuilds its state from their indexes, and continues from the last one's
position, so an interrupted run finishes with exactly the shards of an uninterrupted one.
`manifest.json` and `rejects.jsonl` are written last.

Many nodes: run the same command on each with `--node-rank R --num-nodes N`; node R takes the
input items whose index is R modulo N and writes `node000R-shard-*` plus its own manifest and
rejects (`manifest.node000R.json`); duplicates are found within a node. `sora-prep inspect`
sums all of them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sora_train.data.buckets import BucketTable, load_bucket_table
from sora_train.data.shard_writer import ShardFile, index_path, sample_bytes, write_json_atomic

from ..data.supervised import WorkerFailure, supervised_map
from .probe import PreparedSource, PrepOptions, Rejected, prepare_item
from .sources import SourceItem, iter_sources
from .stats import CorpusStats

SPLITS = ("train", "val")
END = [2**62, 0]  # the input position after the last item


@dataclass(frozen=True)
class ShardOptions:
    """Everything one `sora-prep shards` run needs besides the filters in `prep`."""

    src: Path
    out: Path
    prep: PrepOptions = field(default_factory=PrepOptions)
    shard_samples: int | None = 1000
    shard_bytes: int | None = None
    val_fraction: float = 0.01
    workers: int = 1
    timeout: float = 120.0
    buckets: str | None = "video_256"
    node_rank: int = 0
    num_nodes: int = 1

    @property
    def prefix(self) -> str:
        """Shard name prefix: `shard-`, or `node000R-shard-` when the work is split over nodes."""
        return "shard-" if self.num_nodes == 1 else f"node{self.node_rank:04d}-shard-"

    @property
    def suffix(self) -> str:
        """Manifest and rejects name suffix: empty, or `.node000R` when split over nodes."""
        return "" if self.num_nodes == 1 else f".node{self.node_rank:04d}"


def parse_shard_size(text: str) -> tuple[int | None, int | None]:
    """`1000` -> (1000 samples, None); `512MB` / `2GB` -> (None, bytes)."""
    match = re.fullmatch(r"\s*(\d+)\s*(MB|GB)?\s*", text, flags=re.IGNORECASE)
    if not match or int(match.group(1)) < 1:
        raise ValueError(f"--shard-size {text!r}: give a sample count (1000) or a size (512MB, 2GB)")
    count, unit = int(match.group(1)), (match.group(2) or "").upper()
    if not unit:
        return count, None
    return None, count * (2**20 if unit == "MB" else 2**30)


def split_of(source: str, val_fraction: float) -> str:
    """`val` for a stable `val_fraction` of sources (by a hash of the name), else `train`."""
    position = int(hashlib.sha1(source.encode("utf-8")).hexdigest()[:8], 16) / 2**32
    return "val" if position < val_fraction else "train"


def sample_key(item: SourceItem, clip_index: int | None) -> str:
    """A unique, safe key: the file stem (letters, digits, `_`, `-`), a hash of the source and window, the clip."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(item.source).stem).strip("_")[:40] or "video"
    digest = hashlib.sha1(f"{item.source}|{item.start}|{item.end}".encode()).hexdigest()[:10]
    return f"{stem}-{digest}" + ("" if clip_index is None else f"-{clip_index:04d}")


@dataclass
class SplitState:
    """What the done shards of a split say: where to continue and what they hold."""

    shards: list[dict] = field(default_factory=list)  # {"name", "samples", "bytes"}
    position: list[int] = field(default_factory=lambda: [0, 0])  # [item index, clip index] to write next
    rejects: Counter = field(default_factory=Counter)
    sources: int = 0


def load_done_shards(split_dir: Path, prefix: str, stats: CorpusStats, seen: set[str]) -> SplitState:
    """Read the indexes of the split's done shards (numbered from 0 without a gap); drop anything after."""
    state = SplitState()
    number = 0
    while True:
        shard = split_dir / f"{prefix}{number:06d}.tar"
        if not (shard.is_file() and index_path(shard).is_file()):
            break
        index = json.loads(index_path(shard).read_text(encoding="utf-8"))
        state.shards.append({"name": shard.name, "samples": index["samples"], "bytes": index["bytes"]})
        state.position = index["next"]
        state.rejects.update(r["reason"] for r in index["rejects"])
        state.sources += len(index["sources"])
        seen.update(index["sources"])
        for record in index["records"]:
            stats.add(record)
        number += 1
    for stale in split_dir.glob(f"{prefix}*"):  # partial files; a shard whose index was never written
        numbered = re.match(re.escape(prefix) + r"(\d+)\.", stale.name)
        if stale.name.endswith(".partial") or (numbered and int(numbered.group(1)) >= number):
            stale.unlink()
    return state


class SplitWriter:
    """Fills numbered shards of one split and writes each one's index when it is done."""

    def __init__(self, split_dir: Path, options: ShardOptions, state: SplitState):
        self.split_dir, self.options, self.state = split_dir, options, state
        self.current: ShardFile | None = None
        self.records: list[list] = []
        self.sources: list[str] = []
        self.rejects: list[dict] = []

    def reject(self, item: SourceItem, reason: str, detail: str) -> None:
        """Record an input that gave no sample."""
        self.rejects.append({"source": item.source, "reason": reason, "detail": detail})
        self.state.rejects[reason] += 1

    def accept_source(self, identity: str) -> None:
        """Record an input whose first sample is about to be written."""
        self.sources.append(identity)
        self.state.sources += 1

    def add(self, sample: dict, record: list, position: list[int]) -> None:
        """Write one sample at input `position`, first closing the shard if it is full."""
        if self.current is not None and self._full(sample_bytes(sample)):
            self.commit(position)
        if self.current is None:
            name = f"{self.options.prefix}{len(self.state.shards):06d}.tar"
            self.current = ShardFile(self.split_dir / name)
        self.current.add(sample)
        self.records.append(record)

    def _full(self, incoming: int) -> bool:
        samples, limit = self.current.samples, self.options.shard_bytes
        if self.options.shard_samples is not None and samples >= self.options.shard_samples:
            return True
        return limit is not None and self.current.bytes + incoming > limit

    def commit(self, next_position: list[int]) -> None:
        """Finish the open shard and write its index (which marks it done)."""
        shard, self.current = self.current, None
        shard.commit()
        index = {
            "samples": shard.samples,
            "bytes": shard.bytes,
            "next": next_position,
            "records": self.records,
            "sources": self.sources,
            "rejects": self.rejects,
        }
        write_json_atomic(index_path(shard.path), index)
        self.state.shards.append({"name": shard.path.name, "samples": shard.samples, "bytes": shard.bytes})
        self.records, self.sources, self.rejects = [], [], []

    def finish(self) -> list[dict]:
        """Close the last shard; returns the rejects that no shard's index holds (a split with no sample)."""
        if self.current is not None:
            self.commit(END)
        tail, self.rejects = self.rejects, []
        return tail


def _sample(
    item: SourceItem, prepared: PreparedSource, clip_index: int, original: bytes | None
) -> tuple[dict, list]:
    """The tar sample and stats record of one planned clip."""
    probe, clip = prepared.probe, prepared.clips[clip_index]
    meta = {
        "caption": item.caption,
        "fps": probe.fps,
        # frames in the mp4: with a frame window the whole source's, the clip being the window's
        "num_frames": clip.num_frames if clip.frame_window is None else probe.num_frames,
        "width": clip.width,
        "height": clip.height,
        "duration": round(clip.num_frames / probe.fps, 6),
        "source": item.source,
        "clip": [round(clip.start, 6), round(clip.end, 6)],
        "codec": probe.codec if clip.data is None else "h264",
        "source_rotation": probe.rotation,
        "content_hash": probe.content_hash,
    }
    if clip.frame_window is not None:
        meta["frame_window"] = list(clip.frame_window)
    sample = {
        "__key__": sample_key(item, clip_index if len(prepared.clips) > 1 or clip.data is not None else None),
        "mp4": clip.data if clip.data is not None else original,
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }
    return sample, [clip.width, clip.height, clip.num_frames, probe.fps]


def _write_split(
    split: str, options: ShardOptions, stats: CorpusStats, seen: set[str]
) -> tuple[SplitState, list]:
    """Resume or write every shard of one split; returns its state and the rejects no index holds."""
    split_dir = options.out / split
    split_dir.mkdir(parents=True, exist_ok=True)
    state = load_done_shards(split_dir, options.prefix, stats, seen)
    resume_item, resume_clip = state.position
    writer = SplitWriter(split_dir, options, state)

    def pending() -> Iterator[SourceItem]:
        for item in iter_sources(options.src):
            if item.index % options.num_nodes != options.node_rank or item.index < resume_item:
                continue
            if split_of(item.source, options.val_fraction) == split:
                yield item

    work = functools.partial(prepare_item, options=options.prep)
    for item, result in supervised_map(work, pending(), options.workers, options.timeout):
        if isinstance(result, WorkerFailure | Rejected):
            writer.reject(item, result.reason, result.detail)
            continue
        if not result.clips:
            writer.reject(item, "too_short", "no whole clip fits")
            continue
        first_clip = resume_clip if item.index == resume_item else 0
        identity = f"{result.probe.content_hash}:{item.start}:{item.end}"
        if first_clip == 0:  # a source resumed mid-way was checked and recorded before
            if identity in seen:
                writer.reject(item, "duplicate", f"same content as an earlier input ({identity})")
                continue
            seen.add(identity)
        original = None
        if any(clip.data is None for clip in result.clips):
            original = Path(item.path).read_bytes()
        for clip_index in range(first_clip, len(result.clips)):
            sample, record = _sample(item, result, clip_index, original)
            writer.add(sample, record, [item.index, clip_index])
            if clip_index == 0:  # recorded with the shard that holds the source's first sample
                writer.accept_source(identity)
            stats.add(record)
    return state, writer.finish()


def build_shards(options: ShardOptions) -> dict:
    """Write (or finish writing) the shards, `manifest.json` and `rejects.jsonl`; returns the manifest."""
    if not 0.0 <= options.val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {options.val_fraction}")
    if not 0 <= options.node_rank < options.num_nodes:
        raise ValueError(f"--node-rank {options.node_rank} is not in [0, {options.num_nodes})")
    table: BucketTable | None = load_bucket_table(options.buckets) if options.buckets else None
    iter_sources(options.src)  # fail early on a missing or unsupported SRC
    options.out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    splits, split_stats, tails = {}, {}, []
    for split in SPLITS:
        split_stats[split] = CorpusStats(table)
        state, tail = _write_split(split, options, split_stats[split], seen)
        tails.extend({**reject, "split": split} for reject in tail)
        splits[split] = {
            "shards": [f"{split}/{s['name']}" for s in state.shards],
            "shard_sizes": [s["samples"] for s in state.shards],
            "num_samples": sum(s["samples"] for s in state.shards),
            "bytes": sum(s["bytes"] for s in state.shards),
            "sources": state.sources,
            "rejects": dict(sorted(state.rejects.items())),
        }
        splits[split].update(split_stats[split].to_dict())
    rejects = Counter()
    for entry in splits.values():
        rejects.update(entry["rejects"])
    manifest = {
        "name": "shards",
        "source": str(options.src),
        "node": {"rank": options.node_rank, "count": options.num_nodes},
        "options": {**asdict(options.prep), "shard_samples": options.shard_samples,
                    "shard_bytes": options.shard_bytes, "val_fraction": options.val_fraction,
                    "buckets": options.buckets},
        "inputs": {"accepted": sum(e["sources"] for e in splits.values()), "rejected": sum(rejects.values())},
        "rejects": dict(sorted(rejects.items())),
        "splits": splits,
    }  # fmt: skip
    _write_rejects(options, tails)
    write_json_atomic(options.out / f"manifest{options.suffix}.json", manifest)
    return manifest


def _write_rejects(options: ShardOptions, tails: list[dict]) -> None:
    """`rejects.jsonl`: every reject in input order (from the shard indexes, then the tails)."""
    path = options.out / f"rejects{options.suffix}.jsonl"
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="utf-8") as stream:
        for split in SPLITS:
            for index_file in sorted((options.out / split).glob(f"{options.prefix}*.index.json")):
                for reject in json.loads(index_file.read_text(encoding="utf-8"))["rejects"]:
                    stream.write(json.dumps({**reject, "split": split}) + "\n")
        for reject in tails:
            stream.write(json.dumps(reject) + "\n")
    os.replace(partial, path)
