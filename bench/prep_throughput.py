"""Throughput of `sora-prep shards` (probe + shard) against a bare decord open, per resolution.

What is measured, for each resolution (720p = 1280x720, 480p = 848x480) on its own folder of N
captioned H.264 clips generated at run time (generation is not timed):

* **probe + shard**: `build_shards(ShardOptions(...))` with one worker, no validation split and
  filters loose enough that every clip is accepted without a re-encode (no `clip_seconds`, no
  `max_side`), into a fresh output folder. This is the whole of `sora-prep shards`: walking the
  folder, reading the sidecar captions, a spawned worker that hashes each file (sha256), demuxes
  every packet to count frames and decodes the first frame, then reading the file again and writing
  it into a tar shard, the shard index, manifest and rejects. The run must put all N clips in the
  shards (checked by opening the tar), so the figure is of real work. Reported as total wall time,
  clips/s per worker over it, and clips/s per worker once the fixed cost of a run is taken off: the
  wall time of the same call over an empty folder (worker start-up: a spawned interpreter importing
  PyAV, numpy and the package, once per split, plus the bucket table and the manifest).
* **decord open + metadata**: for the same files, `decord.VideoReader(path, num_threads=1)`,
  `len(vr)` and `vr.get_avg_fps()`, then the reader is deleted; no frame is decoded. This is the
  least any loader pays per file to learn a clip's length and rate.

The ratio (how many times slower the prep is per clip than the bare open) is the prep's per-file
overhead over the unavoidable container open: it says how much of a corpus-sized prep run is spent
on work a leaner probe could skip or share. A stage breakdown (in-process, no worker) shows where
one clip's time goes. Every figure is the median of `--repeats` runs.

    python bench/prep_throughput.py [--clips 8] [--seconds 3] [--fps 24] [--repeats 3]
                                    [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import math
import resource
import shutil
import statistics
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from sora_train.data_prep.build_shards import ShardOptions, build_shards
from sora_train.data_prep.probe import PrepOptions, file_hash, probe_video
from sora_train.data_prep.shard_writer import ShardFile

from sora_train.video_io import Mp4Encoder

# decord is imported inside the functions that use it: the prep's worker is a spawned
# interpreter that re-imports this script, and `sora-prep shards` itself does not load decord.

T = TypeVar("T")
RESOLUTIONS: dict[str, tuple[int, int]] = {"720p": (1280, 720), "480p": (848, 480)}  # width, height
ACCEPT_ALL = PrepOptions(min_seconds=0.0, min_side=2, max_aspect=100.0, clip_seconds=None, max_side=None)


@dataclass(frozen=True)
class Cost:
    """Wall and CPU seconds of a timed call (CPU: this process and its reaped children, all threads)."""

    wall: float
    cpu: float

    def __sub__(self, other: Cost) -> Cost:
        return Cost(self.wall - other.wall, self.cpu - other.cpu)


@dataclass(frozen=True)
class Figures:
    """Medians over the repeats for one resolution."""

    resolution: str
    clips: int
    clip_mb: float  # mean file size
    prep: Cost  # one build_shards call over the N clips
    fixed: Cost  # the same call over an empty folder
    work: Cost  # median over the repeats of (prep - fixed), each paired with its own repeat
    decord: Cost  # open + metadata of the N clips
    shard_mb: float

    def rate(self, cost: Cost) -> float:
        """Clips per wall second of `cost` (nan when noise left nothing to divide by)."""
        return self.clips / cost.wall if cost.wall > 0 else math.nan

    def cpu_ms(self, cost: Cost) -> float:
        """CPU milliseconds per clip of `cost` (nan when noise left nothing)."""
        return 1000 * cost.cpu / self.clips if cost.cpu > 0 else math.nan


# ---------------------------------------------------------------------------------------------
# Test clips


def clip_frames(width: int, height: int, frames: int, seed: int) -> Iterator[np.ndarray]:
    """Deterministic RGB frames: a drifting colour gradient with noise-textured blocks moving over it."""
    rng = np.random.default_rng(seed)
    xs, ys = np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)
    phase, speed = rng.uniform(0, 2 * np.pi, (3, 2)), rng.uniform(0.05, 0.2, (3, 2))
    side = height // 4
    blocks = []
    for _ in range(4):  # (texture, start (x, y), velocity (x, y) in pixels per frame)
        coarse = rng.integers(0, 256, (side // 8 + 1, side // 8 + 1, 3), dtype=np.uint8)
        texture = np.kron(coarse, np.ones((8, 8, 1), dtype=np.uint8))[:side, :side]
        blocks.append((texture, rng.uniform(0, [width - side, height - side]), rng.uniform(-12, 12, 2)))
    frame = np.empty((height, width, 3), dtype=np.uint8)
    for t in range(frames):
        for c in range(3):  # separable: a wave along x plus a wave along y, each drifting
            row = 63.75 * (1 + np.sin(xs * 0.01 * (c + 1) + phase[c, 0] + speed[c, 0] * t))
            col = 63.75 * (1 + np.sin(ys * 0.013 * (c + 1) + phase[c, 1] + speed[c, 1] * t))
            frame[..., c] = (col[:, None] + row[None, :]).astype(np.uint8)
        for texture, start, velocity in blocks:
            x, y = _bounce(start + velocity * t, (width - side, height - side))
            frame[y : y + side, x : x + side] = texture
        yield frame.copy()


def _bounce(position: np.ndarray, limits: tuple[int, int]) -> tuple[int, int]:
    """A position moving back and forth inside [0, limit] on each axis."""
    out = []
    for value, limit in zip(position, limits, strict=True):
        value = abs(value) % (2 * limit)
        out.append(int(value if value <= limit else 2 * limit - value))
    return out[0], out[1]


def write_clips(folder: Path, width: int, height: int, count: int, seconds: float, fps: int) -> list[Path]:
    """`count` mp4 clips with a caption sidecar each; returns the video paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        encoder = Mp4Encoder(height, width, fps)
        for frame in clip_frames(width, height, max(2, round(seconds * fps)), seed=1000 * height + index):
            encoder.add(frame)
        path = folder / f"clip_{index:04d}.mp4"
        path.write_bytes(encoder.finish())
        path.with_suffix(".txt").write_text(f"test clip {index}, {width}x{height}\n", encoding="utf-8")
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------
# Measurements


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that have been waited for."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(fn: Callable[[], T]) -> tuple[Cost, T]:
    """(wall and CPU seconds, result) of one call."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = fn()
    return Cost(time.perf_counter() - wall, cpu_seconds() - cpu), result


def shard_options(src: Path, out: Path) -> ShardOptions:
    """One worker, everything in train, every clip accepted as it is."""
    return ShardOptions(src=src, out=out, prep=ACCEPT_ALL, val_fraction=0.0, workers=1)


def run_prep(src: Path, out: Path, expected: int) -> tuple[Cost, int]:
    """(cost, shard bytes on disk) of `build_shards` into a fresh `out`; checks that all clips landed."""
    shutil.rmtree(out, ignore_errors=True)
    cost, manifest = timed(lambda: build_shards(shard_options(src, out)))
    train = manifest["splits"]["train"]
    assert manifest["inputs"] == {"accepted": expected, "rejected": 0}, manifest["rejects"]
    assert train["num_samples"] == expected, train
    shards = [out / name for name in train["shards"]]
    members = 0
    for shard in shards:
        with tarfile.open(shard) as tar:
            members += sum(1 for name in tar.getnames() if name.endswith(".mp4"))
    assert members == expected, f"{members} mp4 members in the shards, expected {expected}"
    return cost, sum(shard.stat().st_size for shard in shards)


def run_fixed(empty: Path, out: Path) -> Cost:
    """Cost of `build_shards` over an empty folder: what one call pays whatever its input."""
    shutil.rmtree(out, ignore_errors=True)
    cost, manifest = timed(lambda: build_shards(shard_options(empty, out)))
    assert manifest["inputs"]["accepted"] == 0
    return cost


def decord_open(path: Path) -> None:
    """The baseline for one file: open with one thread, frame count, frame rate, close."""
    import decord

    reader = decord.VideoReader(str(path), num_threads=1)
    assert len(reader) > 0 and reader.get_avg_fps() > 0
    del reader


def run_decord(paths: list[Path]) -> Cost:
    """Cost of the decord baseline over all files."""
    import decord  # noqa: F401  (imported before the clock starts)

    cost, _ = timed(lambda: [decord_open(path) for path in paths])
    return cost


STAGES = ("sha256", "probe: demux all + first frame", "read bytes again", "tar write", "decord open+len+fps")


def stage_times(index: int, path: Path, shard: ShardFile) -> dict[str, float]:
    """CPU seconds of each prep stage for one clip (the prep's own functions), and of the decord open."""
    hashing, _ = timed(lambda: file_hash(str(path)))
    probing, probe = timed(lambda: probe_video(str(path)))  # hashes the file again inside
    assert not hasattr(probe, "reason"), probe
    reading, data = timed(path.read_bytes)
    sample = {"__key__": f"clip-{index:04d}", "mp4": data, "json": b"{}"}
    writing, _ = timed(lambda: shard.add(sample))
    opening, _ = timed(lambda: decord_open(path))
    cpu = (hashing.cpu, max(0.0, probing.cpu - hashing.cpu), reading.cpu, writing.cpu, opening.cpu)
    return dict(zip(STAGES, cpu, strict=True))


def stage_breakdown(paths: list[Path], scratch: Path, repeats: int) -> dict[str, float]:
    """Median CPU milliseconds per clip of each stage, in this process (no worker), after a warm-up."""
    shard = ShardFile(scratch / "breakdown.tar")
    stage_times(0, paths[0], shard)  # warm-up: codec and library initialisation
    times = [stage_times(i, p, shard) for _ in range(repeats) for i, p in enumerate(paths)]
    shard.discard()
    return {stage: 1000 * statistics.median(t[stage] for t in times) for stage in STAGES}


def median_cost(costs: list[Cost]) -> Cost:
    """Median wall and median CPU (each on its own)."""
    return Cost(statistics.median(c.wall for c in costs), statistics.median(c.cpu for c in costs))


def measure(resolution: str, paths: list[Path], root: Path, repeats: int) -> Figures:
    """Median figures for one resolution; the prep, empty-folder and decord runs are interleaved."""
    out, empty = root / f"out_{resolution}", root / "empty"
    empty.mkdir(exist_ok=True)
    prep, fixed, bare, sizes = [], [], [], []
    for repeat in range(repeats):
        cost, size = run_prep(paths[0].parent, out, len(paths))
        prep.append(cost)
        sizes.append(size)
        fixed.append(run_fixed(empty, root / "out_empty"))
        bare.append(run_decord(paths))
        print(f"  {resolution} repeat {repeat + 1}: prep {prep[-1].wall:.2f}s wall / {prep[-1].cpu:.2f}s CPU, "
              f"empty-folder call {fixed[-1].wall:.2f}s / {fixed[-1].cpu:.2f}s, "
              f"decord {bare[-1].wall:.3f}s / {bare[-1].cpu:.3f}s", flush=True)  # fmt: skip
    shutil.rmtree(out, ignore_errors=True)
    return Figures(
        resolution=resolution,
        clips=len(paths),
        clip_mb=sum(p.stat().st_size for p in paths) / len(paths) / 2**20,
        prep=median_cost(prep),
        fixed=median_cost(fixed),
        work=median_cost([p - f for p, f in zip(prep, fixed, strict=True)]),
        decord=median_cost(bare),
        shard_mb=statistics.median(sizes) / 2**20,
    )


# ---------------------------------------------------------------------------------------------
# Report


def _num(value: float, suffix: str = "", digits: int = 1) -> str:
    """`12.3` plus a suffix, or `n/a` when the figure could not be formed."""
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}{suffix}"


def print_tables(rows: list[Figures]) -> None:
    """The wall-time table and the CPU-time table, Markdown."""
    print("\n| resolution | clips | MB per clip | prep wall (s) | empty-folder call (s) | prep clips/s/worker "
          "| same, empty-call cost off | decord open+len+fps clips/s | prep slower by "
          "| same, empty-call cost off | shards MB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for f in rows:
        decord = f.rate(f.decord)
        print(
            f"| {f.resolution} | {f.clips} | {f.clip_mb:.2f} | {f.prep.wall:.2f} | {f.fixed.wall:.2f} "
            f"| {_num(f.rate(f.prep))} | {_num(f.rate(f.work))} | {_num(decord)} "
            f"| {_num(decord / f.rate(f.prep), 'x')} | {_num(decord / f.rate(f.work), 'x')} | {f.shard_mb:.1f} |"
        )
    print("\n| resolution | prep CPU ms/clip | empty-folder call CPU (s) | prep CPU ms/clip, empty-call cost off "
          "| decord CPU ms/clip | prep slower by (CPU) | same, empty-call cost off |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for f in rows:
        decord = f.cpu_ms(f.decord)
        print(
            f"| {f.resolution} | {_num(f.cpu_ms(f.prep))} | {f.fixed.cpu:.2f} | {_num(f.cpu_ms(f.work))} "
            f"| {_num(decord)} | {_num(f.cpu_ms(f.prep) / decord, 'x')} | {_num(f.cpu_ms(f.work) / decord, 'x')} |"
        )


def print_breakdown(breakdowns: dict[str, dict[str, float]]) -> None:
    """Per-clip stage CPU times, Markdown."""
    print("\n| CPU ms per clip, in-process | " + " | ".join(breakdowns) + " |")
    print("|---|" + "---|" * len(breakdowns))
    for stage in STAGES:
        print(f"| {stage} | " + " | ".join(f"{breakdowns[r][stage]:.1f}" for r in breakdowns) + " |")


NOTES = """
decord baseline: VideoReader(path, num_threads=1), len(), get_avg_fps(), del; no frame is decoded.
empty-folder call: the same build_shards call over an empty folder (a worker started and stopped for
each split pass, train and val, the bucket table, the manifest); 'cost off' subtracts it, per repeat.
CPU: user + system seconds of this process and the (reaped) worker processes, all threads."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=8, help="clips per resolution (default 8)")
    parser.add_argument("--seconds", type=float, default=3.0, help="clip length in seconds (default 3)")
    parser.add_argument("--fps", type=int, default=24, help="clip frame rate (default 24)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; median (default 3)")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where clips and shards go (default: temp)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the generated clips and the work folder")
    args = parser.parse_args(argv)
    if args.clips < 1 or args.repeats < 1 or args.seconds <= 0 or args.fps < 1:
        parser.error("--clips, --repeats, --fps must be >= 1 and --seconds > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """Generate the clips, measure each resolution, print the tables."""
    args = parse_args(argv)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="prep_throughput-"))
    root.mkdir(parents=True, exist_ok=True)
    made = [root / name for name in ("empty", "out_empty")]
    made += [root / f"{kind}_{r}" for r in RESOLUTIONS for kind in ("clips", "out")]
    try:
        rows, breakdowns = [], {}
        for resolution, (width, height) in RESOLUTIONS.items():
            print(f"{resolution}: generating {args.clips} clips at {width}x{height}, "
                  f"{args.seconds:g}s at {args.fps} fps", flush=True)  # fmt: skip
            folder = root / f"clips_{resolution}"
            paths = write_clips(folder, width, height, args.clips, args.seconds, args.fps)
            rows.append(measure(resolution, paths, root, args.repeats))
            breakdowns[resolution] = stage_breakdown(paths, root, args.repeats)
        print_tables(rows)
        print_breakdown(breakdowns)
        print(NOTES)
    finally:
        if args.keep:
            print(f"kept {root}")
        elif args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
        else:
            for path in made:
                shutil.rmtree(path, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
