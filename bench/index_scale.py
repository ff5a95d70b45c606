"""Time to the training loader's first batch, and its memory, on corpora of 10M and 100M samples.

Only the compact per-shard indexes are read (no media): does the loader start, and resume into a
late epoch, within the targets at that scale?

A synthetic corpus of N samples is written first (`--samples`, default 10M and 100M;
`--samples-per-shard`, default 10000): per shard a sparse `shard-NNNNNN.tar` of the right size
(`truncate`, so it takes no disk space and reads as zeros) and its compact index
`shard-NNNNNN.idx` (`write_sample_index`), whose records are videos of a few shapes (1280x720,
854x480, 640x360, 720x1280 at 24/25/30 fps, 48..300 frames) spread over the 5 buckets of a
small table, plus about 5% too short for any bucket. Sample starts are 512-byte aligned and
strictly increasing, and each index's probe is the CRC of the tar's (zero) blocks where its first
and last samples start, so the loader accepts every index as is. Writing it is timed but is not
one of the measured figures.

Then, for each corpus, three starts, each in a fresh process (so peak RSS is per start):
  - epoch 0, cold: `VideoLoader` over every shard with an empty cache directory (each side index
    is probed against its tar once and a `.verified` marker written), then its first planned batch
    and the byte range of each of its samples (`ShardSetIndex.sample_range`);
  - epoch 0, warm: the same again, the markers now in the cache;
  - epoch 5: the same as warm, then `load_state_dict` of a merged-state cursor (no rank) a few
    hundred thousand batches into epoch 5 (its position, counted from the epoch lengths, comes
    from the cold start's loader after its measurement), and the batch checked to be of epoch 5.
"first batch s" runs from just before the loader is constructed (imports excluded) to having the
first batch's byte ranges. RSS is VmRSS at that point; peak RSS is `ru_maxrss` once the block the
planner plans ahead in the background is done (imports included: ~225 MiB, torch most of it).
The loader is given `decoder="pyav"` (nothing is decoded here); `auto`, where it picks decord,
imports decord too, another ~115 MiB in the same process on the machine this was written on.
The index files are in the page cache from being written: "cold" is the loader's cache, not the
disk's. Targets, for every corpus size: first batch <= 30 s, peak RSS <= 1024 MiB, and the
epoch-5 start within 1.1x of the warm epoch-0 start (medians of `--repeats` starts).
`--profile` prints, from each measured process, the functions taking most of its time (cProfile).

    python bench/index_scale.py [--samples 10000000 100000000] [--samples-per-shard 10000]
        [--repeats 3] [--dir DIR] [--keep] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import hashlib
import json
import os
import platform
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scratch import scratch_dir  # bench/scratch.py: the script's own directory is on sys.path

from sora_train.data.buckets import Bucket, BucketTable

if TYPE_CHECKING:
    from sora_train.data.loader import VideoLoader

REPO = Path(__file__).resolve().parent.parent
TABLE = BucketTable(
    (
        Bucket(16, 288, 512),  # 16:9, a span of 31 source frames at stride 2
        Bucket(32, 288, 512),  # 63
        Bucket(64, 288, 512),  # 127
        Bucket(16, 512, 288),  # 9:16
        Bucket(32, 512, 288),
    ),
    stride=2,
)
BATCH_SIZES = (16, 8, 4, 16, 8)
SHAPES = np.array([(1280, 720), (854, 480), (640, 360), (720, 1280)], np.int32)  # (width, height)
SHAPE_SHARE = (0.4, 0.25, 0.15, 0.2)
FPS = np.array([24.0, 25.0, 30.0])
TOO_SHORT = 0.05  # share of samples with fewer frames (8..30) than the smallest bucket spans
EPOCH5_OFFSET = 300_000  # batches into epoch 5 where the resume lands (at most half the epoch)
TARGET_SECONDS, TARGET_MIB, TARGET_RATIO = 30.0, 1024.0, 1.1


def shard_records(rng: np.random.Generator, n: int) -> tuple[np.ndarray, int]:
    """(records, tar bytes) of one synthetic shard of `n` videos, consecutive in the tar."""
    from sora_train.data.sample_index import RECORD

    records = np.zeros(n, RECORD)
    shape = rng.choice(len(SHAPES), n, p=SHAPE_SHARE)
    records["width"], records["height"] = SHAPES[shape, 0], SHAPES[shape, 1]
    short = rng.random(n) < TOO_SHORT
    records["frames"] = np.where(short, rng.integers(8, 31, n), rng.integers(48, 301, n))
    records["fps"] = FPS[rng.integers(0, len(FPS), n)]
    records["latent_bucket"] = -1  # kind 0: video
    pixels = records["frames"].astype(np.int64) * records["width"] * records["height"]
    blocks = 5 + -(-pixels // (60 * 512))  # ~0.13 bit per pixel, and the headers, json and txt
    records["length"] = blocks * 512
    records["start"] = np.concatenate([[0], np.cumsum(records["length"][:-1])])
    return records, int(records["start"][-1] + records["length"][-1]) + 1024  # the end-of-archive blocks


def write_shard(directory: Path, shard: int, n: int, seed: int) -> int:
    """Write the sparse tar and the compact index of one shard; returns the index's bytes."""
    from sora_train.data.index import probe_checksum
    from sora_train.data.sample_index import SampleIndex, write_sample_index

    records, tar_bytes = shard_records(np.random.default_rng([seed, shard]), n)
    tar = directory / f"shard-{shard:06d}.tar"
    with open(tar, "wb") as stream:
        stream.truncate(tar_bytes)
    probe = probe_checksum(str(tar), records["start"])
    index = directory / f"shard-{shard:06d}.idx"
    write_sample_index(index, SampleIndex(tar_bytes, records, {}, 0, probe))
    return index.stat().st_size


@dataclass(frozen=True)
class Corpus:
    """A synthetic corpus on disk."""

    directory: Path
    samples: int
    shards: int
    index_bytes: int
    seconds: float  # to write it


def shard_urls(directory: Path, shards: int) -> list[str]:
    """The paths of a corpus's shards, in order."""
    return [str(directory / f"shard-{s:06d}.tar") for s in range(shards)]


def build_corpus(directory: Path, samples: int, per_shard: int, threads: int = 8) -> Corpus:
    """Write a corpus of `samples` samples, `per_shard` to a shard (the last one takes the rest)."""
    directory.mkdir(parents=True, exist_ok=True)
    shards = -(-samples // per_shard)
    sizes = [min(per_shard, samples - s * per_shard) for s in range(shards)]
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:  # the fsync of each index overlaps the others
        written = sum(pool.map(lambda s: write_shard(directory, s, sizes[s], 0), range(shards)))
    return Corpus(directory, samples, shards, written, time.perf_counter() - start)


def rss_mib() -> float:
    """This process's resident set now (VmRSS), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    """This process's peak resident set so far, in MiB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def first_batch(urls: list[str], cache: Path, position: int | None) -> tuple[VideoLoader, dict]:
    """Construct the loader, resume at global batch `position` (None: the start), plan the first
    batch and resolve its samples' byte ranges: (loader, figures)."""
    from sora_train.data.loader import LoaderSettings, VideoLoader

    settings = LoaderSettings(
        TABLE, BATCH_SIZES, seed=0, shuffle_window=1000, decoder="pyav", latent_shapes=None, cache_dir=cache
    )
    start = time.perf_counter()
    loader = VideoLoader([urls], settings)
    constructed = time.perf_counter()
    if position is not None:
        state = loader.state_dict()
        loader.load_state_dict({**state, "cursor": {"start": position, "done": []}, "skipped": {}})
    batch = loader.planned(0)
    planned = time.perf_counter()
    ranges = [loader.indexes[0].sample_range(int(s)) for s in batch.samples]
    done = time.perf_counter()
    if not ranges or min(length for _, _, length in ranges) <= 0:
        raise SystemExit(f"first batch without byte ranges: {ranges}")
    figures = {
        "first_batch_s": done - start, "construct_s": constructed - start, "plan_s": planned - constructed,
        "ranges_s": done - planned, "rss_mib": rss_mib(), "epoch": batch.epoch, "bucket": batch.bucket,
        "batch_samples": len(ranges), "plan_id": loader.plan_id,
    }  # fmt: skip
    return loader, figures


def epoch5_position(loader: VideoLoader) -> tuple[int, int]:
    """(global position a few hundred thousand batches into epoch 5, batches in epoch 5)."""
    planner = loader.mixture.planners[0]
    before = sum(planner.epoch_length(epoch) for epoch in range(5))
    length = planner.epoch_length(5)
    return before + min(EPOCH5_OFFSET, length // 2), length


def child(args: argparse.Namespace) -> None:
    """One measured start (in its own process); prints its figures as one JSON line."""
    import sora_train.data.loader  # noqa: F401  imported before the clock starts

    urls = shard_urls(args.corpus, args.shards)
    figures: dict = {"import_rss_mib": rss_mib()}
    profile = cProfile.Profile() if args.profile else None
    if profile:
        profile.enable()
    loader, measured = first_batch(urls, args.cache, args.position)
    if profile:
        profile.disable()
        pstats.Stats(profile, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
    for planner in loader.mixture.planners:  # the block planned ahead counts towards the peak
        planner._planning.shutdown(wait=True)
    figures |= measured | {"peak_rss_mib": peak_rss_mib()}
    if args.position is None:
        figures["epoch5_position"], figures["epoch5_batches"] = epoch5_position(loader)
        figures["epoch0_batches"] = loader.mixture.planners[0].epoch_length(0)
    print(json.dumps(figures))


def run_child(corpus: Corpus, cache: Path, position: int | None, profile: bool) -> dict:
    """One start measured in a fresh process of this script."""
    command = [sys.executable, __file__, "--child", "--corpus", str(corpus.directory)]
    command += ["--shards", str(corpus.shards), "--cache", str(cache)]
    command += ["--position", str(position)] if position is not None else []
    command += ["--profile"] if profile else []
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if profile or out.returncode:
        print(out.stderr, file=sys.stderr)
    if out.returncode:
        raise SystemExit(f"the measured process failed ({out.returncode}): {' '.join(command[:8])} ...")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(corpus: Corpus, cache: Path, repeats: int, profile: bool) -> dict[str, list[dict]]:
    """The cold start (into an empty cache), then `repeats` warm epoch-0 and epoch-5 starts, interleaved."""
    shutil.rmtree(cache, ignore_errors=True)
    runs: dict[str, list[dict]] = {
        "cold": [run_child(corpus, cache, None, profile)],
        "warm": [],
        "epoch5": [],
    }
    position = runs["cold"][0]["epoch5_position"]
    for _ in range(repeats):
        runs["warm"].append(run_child(corpus, cache, None, profile))
        runs["epoch5"].append(run_child(corpus, cache, position, profile))
    plans = {run["plan_id"] for kind in runs.values() for run in kind}
    epochs = {name: {run["epoch"] for run in kind} for name, kind in runs.items()}
    if len(plans) != 1 or epochs != {"cold": {0}, "warm": {0}, "epoch5": {5}}:
        raise SystemExit(f"starts disagree: plans {plans}, epochs of the first batch {epochs}")
    return runs


def median(runs: list[dict], key: str) -> float:
    """The median of one figure over runs."""
    return statistics.median(run[key] for run in runs)


def row(corpus: Corpus, runs: dict[str, list[dict]]) -> tuple[str, bool]:
    """The table row of one corpus, and whether it meets every target."""
    cold, warm, epoch5 = (median(runs[k], "first_batch_s") for k in ("cold", "warm", "epoch5"))
    peak = max(run["peak_rss_mib"] for kind in runs.values() for run in kind)
    ratio = epoch5 / warm
    checks = {
        "time": max(cold, warm, epoch5) <= TARGET_SECONDS, "rss": peak <= TARGET_MIB, "resume": ratio <= TARGET_RATIO,
    }  # fmt: skip
    verdict = (
        "PASS"
        if all(checks.values())
        else "FAIL (" + ", ".join(k for k, ok in checks.items() if not ok) + ")"
    )
    cells = (
        f"{corpus.samples:,}", f"{corpus.shards:,}", f"{corpus.index_bytes / 2**20:,.0f} MiB", f"{cold:.2f}",
        f"{warm:.2f}", f"{epoch5:.2f}", f"{ratio:.2f}", f"{peak:.0f}", verdict,
    )  # fmt: skip
    return "| " + " | ".join(cells) + " |", all(checks.values())


def details(corpus: Corpus, runs: dict[str, list[dict]]) -> list[str]:
    """Per-start lines: the phases of the first batch and the memory (medians)."""
    lines = []
    for name, kind in runs.items():
        figures = {key: median(kind, key) for key in ("construct_s", "plan_s", "ranges_s", "import_rss_mib")}
        figures |= {key: median(kind, key) for key in ("rss_mib", "peak_rss_mib", "batch_samples")}
        lines.append(
            f"| {corpus.samples:,} | {name} | {figures['construct_s']:.2f} | {figures['plan_s']:.3f} | "
            f"{figures['ranges_s']:.3f} | {figures['import_rss_mib']:.0f} | {figures['rss_mib']:.0f} | "
            f"{figures['peak_rss_mib']:.0f} | {figures['batch_samples']:.0f} |"
        )
    return lines


def source_version() -> str:
    """The commit of this checkout, whether `sora_train/` differs from it (read-only git), and a
    digest of its sources, so a change during the run shows."""

    def git(*command: str) -> str:
        return subprocess.run(["git", *command], cwd=REPO, capture_output=True, text=True, check=False).stdout

    digest = hashlib.sha1()
    for path in sorted((REPO / "sora_train").rglob("*.py")):
        digest.update(path.read_bytes())
    dirty = " + uncommitted changes" * bool(git("status", "--porcelain", "--", "sora_train").strip())
    return f"{git('rev-parse', '--short', 'HEAD').strip() or 'unknown'}{dirty} (sora_train/ {digest.hexdigest()[:8]})"


def machine_lines(version: str) -> list[str]:
    """The machine, the date and the commit."""
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor() or platform.machine(),
    )  # fmt: skip
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return [
        f"machine: {os.cpu_count()} CPUs ({model}), {memory:.0f} GiB, Python {platform.python_version()}, "
        f"numpy {np.__version__}",
        f"started: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, commit {version}",
    ]


def report(
    results: list[tuple[Corpus, dict[str, list[dict]]]], repeats: int, header: list[str], version: str
) -> bool:
    """Print the tables (after `header`, the machine as it started); whether every corpus met every target."""
    print(*header, sep="\n")
    if source_version() != version:
        print(
            f"WARNING: sora_train changed during the run (now {source_version()}): the figures mix versions"
        )
    print(f"buckets {[b.name for b in TABLE.buckets]} stride {TABLE.stride}, batch sizes {BATCH_SIZES}; "
          f"warm and epoch-5 figures are medians of {repeats} starts")  # fmt: skip
    for corpus, runs in results:
        print(f"{corpus.samples:,} samples: written in {corpus.seconds:.1f} s (not measured); epoch 0 has "
              f"{runs['cold'][0]['epoch0_batches']:,} batches, epoch 5 {runs['cold'][0]['epoch5_batches']:,}, "
              f"resumed at global batch {runs['cold'][0]['epoch5_position']:,}")  # fmt: skip
    print("\n| samples | shards | index on disk | first batch s (epoch 0, cold) | first batch s (epoch 0, warm) "
          "| first batch s (epoch 5) | epoch 5 / epoch 0 | peak RSS MiB | targets |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    rows = [row(corpus, runs) for corpus, runs in results]
    print(*(text for text, _ in rows), sep="\n")
    print(f"targets: first batch <= {TARGET_SECONDS:.0f} s, peak RSS <= {TARGET_MIB:.0f} MiB, "
          f"epoch 5 / epoch 0 (warm) <= {TARGET_RATIO}")  # fmt: skip
    print("\n| samples | start | construct s | plan first batch s | byte ranges s | RSS after imports MiB "
          "| RSS at first batch MiB | peak RSS MiB | batch samples |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for corpus, runs in results:
        print(*details(corpus, runs), sep="\n")
    return all(ok for _, ok in rows)


def main(argv: list[str] | None = None) -> int:
    """Write each corpus, measure its starts, print the tables; 1 when a target is missed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[10_000_000, 100_000_000])
    parser.add_argument("--samples-per-shard", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3, help="warm epoch-0 and epoch-5 starts per corpus")
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write (default: a temporary directory)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the corpora and caches")
    parser.add_argument("--profile", action="store_true", help="cProfile each measured start (on stderr)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--shards", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--position", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    version = source_version()
    header = machine_lines(version)
    names = [f"{kind}-{n}" for n in args.samples for kind in ("corpus", "cache")]
    results = []
    with scratch_dir(args.dir, args.keep, "index_scale-", names) as root:
        for samples in args.samples:
            corpus = build_corpus(root / f"corpus-{samples}", samples, args.samples_per_shard)
            print(
                f"wrote {samples:,} samples in {corpus.shards:,} shards in {corpus.seconds:.1f} s", flush=True
            )
            results.append((corpus, measure(corpus, root / f"cache-{samples}", args.repeats, args.profile)))
    return 0 if report(results, args.repeats, header, version) else 1


if __name__ == "__main__":
    sys.exit(main())
