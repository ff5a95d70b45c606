"""`sora-prep inspect DIR`: what a shard directory holds, without decoding video.

Reads the manifests `sora-prep shards` / `encode` wrote (all nodes' together); for a directory of
tars without one, reads every sample's JSON instead.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from sora_train.data.buckets import load_bucket_table
from sora_train.data.decode import SkipSample
from sora_train.data.metadata import video_fields
from sora_train.data.shards import iter_shard, read_metadata

from .stats import CorpusStats


def _scan(directory: Path, buckets: str | None) -> dict:
    """Statistics from the samples themselves (for shards no manifest describes)."""
    stats = CorpusStats(load_bucket_table(buckets) if buckets else None)
    shards = sorted(directory.rglob("*.tar"))
    unreadable = 0
    for shard in shards:
        for sample in iter_shard(str(shard)):
            try:
                fields = video_fields(read_metadata(sample))
                stats.add([fields.width, fields.height, fields.clip_frames, fields.fps])
            except (SkipSample, TypeError, ValueError, ZeroDivisionError):  # malformed or absent fields
                unreadable += 1
    return {"shards": len(shards), "stats": stats.to_dict(), "no_metadata": unreadable}


def inspect_directory(directory: str | Path, buckets: str | None = None) -> str:
    """A human-readable report: counts, hours, bucket histogram, rejects or skips by reason."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory")
    manifests = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(directory.glob("manifest*.json"))]
    lines = [f"{directory}:"]
    if manifests and all(m.get("name") == "shards" for m in manifests):
        rejects: Counter = Counter()
        for manifest in manifests:
            rejects.update(manifest["rejects"])
        for split in ("train", "val"):
            entries = [m["splits"][split] for m in manifests if split in m["splits"]]
            samples = sum(e["num_samples"] for e in entries)
            hours = sum(e["hours"] for e in entries)
            shards = sum(len(e["shards"]) for e in entries)
            lines.append(f"  {split}: {samples} samples, {hours:.3f} h, {shards} shards")
            counts: Counter = Counter()
            for entry in entries:
                counts.update(entry.get("buckets", {}).get("counts", {}))
            lines += [f"    bucket {name}: {count}" for name, count in counts.items()]
        accepted = sum(m["inputs"]["accepted"] for m in manifests)
        lines.append(f"  inputs: {accepted} accepted, {sum(rejects.values())} rejected")
        lines += [f"    {reason}: {count}" for reason, count in sorted(rejects.items())]
    elif manifests and manifests[0].get("name") == "latents":
        manifest = manifests[0]
        lines.append(f"  latents ({manifest['latent_space']}, text: {manifest['text_encoder']}): "
                     f"{manifest['num_samples']} samples, {len(manifest['shards'])} shards")  # fmt: skip
        lines += [f"    bucket {name}: {count}" for name, count in manifest["buckets"]["counts"].items()]
        lines += [f"    skipped {reason}: {count}" for reason, count in manifest["skipped"].items()]
    else:
        scanned = _scan(directory, buckets)
        stats = scanned["stats"]
        lines.append(
            f"  {stats['samples']} samples, {stats['hours']:.3f} h, {scanned['shards']} shards (no manifest)"
        )
        lines += [
            f"    bucket {name}: {count}"
            for name, count in stats.get("buckets", {}).get("counts", {}).items()
        ]
        if scanned["no_metadata"]:
            lines.append(f"    samples without usable metadata: {scanned['no_metadata']}")
    return "\n".join(lines)
