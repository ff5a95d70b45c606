"""Throughput of `sora-prep shards` (probe + shard) against a bare decord open, per resolution.

What is measured, for each resolution (720p = 1280x720, 480p = 848x480) on its own folder of N
captioned H.264 clips generated at run time (generation is not timed):

* **probe + shard**: `build_shards(ShardOptions(...))` with one worker, no validation split and
  filters loose enough that every clip is accepted without a re-encode (no `clip_seconds`, no
  `max_side`), into a fresh output folder. This is the whole of `sora-prep shards`: walking the
  folder, reading the sidecar captions, a spawned worker that hashes each file (sha256), demuxes
  every packet to count frames and decodes the first frame, then reading the file again and writing
  it into a tar shard, the shard index, manifest and rejects. The run must put all N clips in the
  shards (checked by opening the tar), so the figure is of real work. Reported as clips/s per
  worker over the whole call; beside it, the cost of the same call over an empty folder, which every
  call pays whatever its input (a spawned worker importing PyAV, numpy and the package for each
  split pass, train and val; the bucket table; the manifest). That fixed cost is reported, not
  subtracted: with a few clips it is larger than the work and its noise, so a difference would be
  noise. The per-clip cost without it comes from the stage breakdown below.
* **decord open + metadata**: for the same files, `decord.VideoReader(path, num_threads=1)`,
  `len(vr)` and `vr.get_avg_fps()`, then the reader is deleted; no frame is decoded. This is the
  least any loader pays per file to learn a clip's length and rate.

The ratio (how many times slower the prep is per clip than the bare open) is the prep's per-file
overhead over the unavoidable container open: it says how much of a corpus-sized prep run is spent
on work a leaner probe could skip or share. Each figure is given in wall time and in CPU time (user
+ system of this process and the reaped worker, all threads): on a shared or virtual machine the
wall time also counts what other work and the hypervisor took, the CPU time does not. A stage
breakdown (in-process, no worker, the prep's own functions, after a warm-up) shows where one clip's
CPU time goes; its sum is the prep's per-clip work without the fixed cost, compared with decord's.
Every figure is the median of `--repeats` runs.

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
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import av
import numpy as np

# The prep's worker is a spawned interpreter that re-imports the main module: under `sora-prep`
# that is the CLI, so this script imports it too, and the worker's start-up costs what it costs
# there. decord is imported inside the functions that use it, since `sora-prep` does not load it.
import sora_train.data_prep.cli  # noqa: F401  (see above)
from scratch import scratch_dir  # bench/scratch.py: the script's own directory is on sys.path
from sora_train.data_prep.build_shards import ShardOptions, build_shards
from sora_train.data_prep.probe import PrepOptions, file_hash, probe_video

from sora_train.data.shard_writer import ShardFile
from sora_train.video_io import Mp4Encoder

T = TypeVar("T")
RESOLUTIONS: dict[str, tuple[int, int]] = {"720p": (1280, 720), "480p": (848, 480)}  # width, height
ACCEPT_ALL = PrepOptions(min_seconds=0.0, min_side=2, max_aspect=100.0, clip_seconds=None, max_side=None)


@dataclass(frozen=True)
class Cost:
    """Wall and CPU seconds of a timed call (CPU: this process and its reaped children, all threads)."""

    wall: float
    cpu: float


@dataclass(frozen=True)
class Figures:
    """Medians over the repeats for one resolution."""

    resolution: str
    clips: int
    clip_mb: float  # mean file size
    prep: Cost  # one build_shards call over the N clips
    fixed: Cost  # the same call over an empty folder
    decord: Cost  # open + metadata of the N clips
    shard_mb: float

    def rate(self, cost: Cost) -> float:
        """Clips per wall second of `cost`."""
        return self.clips / cost.wall


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


PREP_STAGES = (
    "sha256",
    "probe: open, demux every packet, decode the first frame",
    "read bytes again",
    "tar write",
)
PROBE_PARTS = ("probe, of which PyAV open", "probe, of which PyAV open + demux every packet")
BASELINE = "decord open+len+fps"
STAGES = (*PREP_STAGES, *PROBE_PARTS, BASELINE)


def av_open(path: Path, demux: bool) -> None:
    """The first steps of the prep's probe on their own: open the container, optionally count packets."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if demux:
            sum(1 for packet in container.demux(stream) if packet.size)


def stage_times(index: int, path: Path, shard: ShardFile) -> dict[str, float]:
    """CPU seconds of each prep stage for one clip (the prep's own functions), and of the decord open."""
    hashing, _ = timed(lambda: file_hash(str(path)))
    probing, probe = timed(lambda: probe_video(str(path)))  # hashes the file again inside
    assert not hasattr(probe, "reason"), probe
    reading, data = timed(path.read_bytes)
    sample = {"__key__": f"clip-{index:04d}", "mp4": data, "json": b"{}"}
    writing, _ = timed(lambda: shard.add(sample))
    opening, _ = timed(lambda: av_open(path, demux=False))
    demuxing, _ = timed(lambda: av_open(path, demux=True))
    baseline, _ = timed(lambda: decord_open(path))
    cpu = (
        hashing,
        Cost(0, max(0.0, probing.cpu - hashing.cpu)),
        reading,
        writing,
        opening,
        demuxing,
        baseline,
    )
    return dict(zip(STAGES, (c.cpu for c in cpu), strict=True))


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
        decord=median_cost(bare),
        shard_mb=statistics.median(sizes) / 2**20,
    )


# ---------------------------------------------------------------------------------------------
# Report


def _num(value: float, suffix: str = "") -> str:
    """`12.3` plus a suffix, or `n/a` when the figure could not be formed (a zero time)."""
    return "n/a" if math.isnan(value) or math.isinf(value) else f"{value:.1f}{suffix}"


def print_table(rows: list[Figures]) -> None:
    """Whole `build_shards` calls against the decord baseline, Markdown."""
    print("\n| resolution | clips | MB per clip | prep wall (s) | prep CPU (s) | prep clips/s/worker "
          "| decord open+len+fps clips/s | prep slower by (wall) | prep slower by (CPU) "
          "| empty-folder call, wall / CPU (s) | shards MB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for f in rows:
        print(
            f"| {f.resolution} | {f.clips} | {f.clip_mb:.2f} | {f.prep.wall:.2f} | {f.prep.cpu:.2f} "
            f"| {_num(f.rate(f.prep))} | {_num(f.rate(f.decord))} | {_num(f.prep.wall / f.decord.wall, 'x')} "
            f"| {_num(f.prep.cpu / f.decord.cpu, 'x')} | {f.fixed.wall:.2f} / {f.fixed.cpu:.2f} | {f.shard_mb:.1f} |"
        )


def print_breakdown(breakdowns: dict[str, dict[str, float]]) -> None:
    """Per-clip stage CPU times, their sum, and the ratio to decord, Markdown."""
    work = {r: sum(t[stage] for stage in PREP_STAGES) for r, t in breakdowns.items()}

    def row(label: str, values: dict[str, str]) -> None:
        print(f"| {label} | " + " | ".join(values[r] for r in breakdowns) + " |")

    print("\n| CPU ms per clip, in-process | " + " | ".join(breakdowns) + " |")
    print("|---|" + "---|" * len(breakdowns))
    for stage in (PREP_STAGES[0], PREP_STAGES[1], *PROBE_PARTS, *PREP_STAGES[2:]):
        row(stage, {r: f"{t[stage]:.1f}" for r, t in breakdowns.items()})
    row("**prep work per clip (sum)**", {r: f"**{w:.1f}**" for r, w in work.items()})
    row("= clips/s per worker, fixed cost off", {r: f"{1000 / w:.1f}" for r, w in work.items()})
    row(BASELINE, {r: f"{t[BASELINE]:.1f}" for r, t in breakdowns.items()})
    row("prep work slower by", {r: _num(work[r] / t[BASELINE], "x") for r, t in breakdowns.items()})


NOTES = """
decord baseline: VideoReader(path, num_threads=1), len(), get_avg_fps(), del; no frame is decoded.
empty-folder call: the same build_shards call over an empty folder (the folder walk, the bucket
table, the manifest; no worker starts for a pass with nothing to do): the fixed cost of a call.
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
    names = ["empty", "out_empty"] + [f"{kind}_{r}" for r in RESOLUTIONS for kind in ("clips", "out")]
    with scratch_dir(args.workdir, args.keep, "prep_throughput-", names) as root:
        rows, breakdowns = [], {}
        for resolution, (width, height) in RESOLUTIONS.items():
            print(f"{resolution}: generating {args.clips} clips at {width}x{height}, "
                  f"{args.seconds:g}s at {args.fps} fps", flush=True)  # fmt: skip
            folder = root / f"clips_{resolution}"
            paths = write_clips(folder, width, height, args.clips, args.seconds, args.fps)
            rows.append(measure(resolution, paths, root, args.repeats))
            breakdowns[resolution] = stage_breakdown(paths, root, args.repeats)
        print_table(rows)
        print_breakdown(breakdowns)
        print(NOTES)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
