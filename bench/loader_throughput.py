"""Throughput of the training loader against a bare read of the same shards: video clips and latents,
and the decoders (`data.decoder`) against each other.

Three comparisons, each at equal process counts, printed side by side from one run:

* **video**, once per decoder (`--decoders`, default every one installed): clips/s of
  `VideoLoader` (read the sample's byte range, split its tar members, parse the json, decode with
  that decoder, resize + centre crop to the bucket, stack the uint8 batch) against a bare loop of
  the same decoding library over the same tars (`tarfile` in file order, `.read()` of each
  sample's mp4, then the library's own calls for the same frames, same stride, centred window:
  decord `VideoReader(io.BytesIO(data), num_threads=1)` + `get_batch` + `del reader`; torchcodec
  `VideoDecoder(data, seek_mode="exact", num_ffmpeg_threads=1)` + `get_frames_at`; PyAV
  `av.open` + decoding on one thread from the start to the last wanted frame + `to_ndarray`; no
  resize, no float conversion, no batching). The loader with `num_workers=0` (decoding in this process)
  is compared with the loop in this process; the loader with `num_workers=N` with the loop split
  over N spawned processes (each takes every N-th sample). Target: loader / bare >= 0.8.
* **decoders**: the video runs above, each decoder's loader clips/s (and CPU per clip) over the
  first decoder's from the same repeat, so the decoders are compared side by side, interleaved.
* **latent**: samples/s of `VideoLoader` on latent shards (`KEY.latent.npy` float16 (C, f, h, w)
  and `KEY.json` with a caption and the bucket name) against a raw sequential read of the same
  tars (`tarfile`, `.read()` of every member). Target: loader / raw >= 0.9.

Inputs are written at run time (not timed): by default textured S x S H.264 clips (`--size`,
`--source-frames`, encoded with `sora_train.video_io.encode_mp4`), so the decode costs what a real
clip of that size does; `--size 0` uses the demo's synthetic corpus instead (`generate_corpus`,
clips of 54-96 pixels, 16-20 frames). Building the loader's shard index is timed on its own
(first build into an empty cache, then a cached build) and left out of the throughput. Each side
runs a short warm-up (worker start-up, imports, the first reader) before its clock starts, and
both sides of a comparison measure the same number of samples. Comparisons are interleaved and
repeated (`--repeats`, default 5); every figure is the median, every ratio the median of the paired
runs.
Wall times count what else the machine did (other processes; on a VM the CPU time the
hypervisor takes, "steal", which is printed). CPU times do not: user + system seconds of every
process doing the work (this one with all its threads, the loader's workers read from /proc,
the bare processes' own), per sample. Their ratio, bare / loader, is the throughput ratio the
two sides would have on otherwise idle cores, and is the steadier figure on a shared machine.
A per-sample CPU breakdown of the loader's own stages (in this process, median over the samples,
once per decoder) shows where the difference goes, the resize + crop among them. Linux only (/proc).

Torch runs with `--torch-threads` intra-op threads in this process (default 1, so the in-process
pair compares one core with one core); the loader's decode workers run one thread each.

    python bench/loader_throughput.py [--size 256] [--source-frames 33] [--videos 48]
        [--frames 17] [--stride 2] [--bucket-side 224] [--batch 4] [--video-samples 48]
        [--latents 1024] [--latent-batch 16] [--latent-samples 2048] [--workers 0 2]
        [--decoders decord torchcodec pyav] [--repeats 5] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import importlib
import io
import itertools
import json
import multiprocessing
import os
import shutil
import statistics
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import av
import machine  # bench/machine.py and bench/scratch.py: the script's own directory is on sys.path
import numpy as np
import torch
from scratch import scratch_dir

from sora_train.data.buckets import Bucket, BucketTable
from sora_train.data.decode import (
    AUTO_ORDER,
    ClipSpec,
    decode_frames,
    fit_frames,
    installed_decoders,
    resolve_decoder,
)
from sora_train.data.index import LATENT_MEMBER, ShardSetIndex, build_index
from sora_train.data.loader import LoaderSettings, VideoLoader
from sora_train.data.samples import all_finite, split_members
from sora_train.data.shard_writer import write_shard
from sora_train.data.shards import load_npy, read_captioned
from sora_train.data.storage import read_range, resolve_shards
from sora_train.data.synthetic import generate_corpus
from sora_train.video_io import encode_mp4

TARGETS = {"video": 0.8, "latent": 0.9}
FPS = 24
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Run:
    """One timed stretch: samples read, wall seconds, CPU seconds of every process doing the work."""

    samples: int
    wall: float
    cpu: float

    @property
    def rate(self) -> float:
        """Samples per wall second."""
        return self.samples / self.wall

    @property
    def cpu_ms(self) -> float:
        """CPU milliseconds per sample."""
        return 1000 * self.cpu / self.samples


@dataclass(frozen=True)
class Case:
    """One comparison: a shard set, how the loader reads it, and what the bare side does."""

    path: str  # video | latent
    shards: list[str]
    settings: LoaderSettings
    warmup_batches: int
    samples: int
    processes: int  # of the bare side; the loader decodes in settings.num_workers processes (0: here)

    @property
    def key(self) -> tuple[str, int, str]:
        """(path, loader workers, decoder): where its runs are filed; latents decode nothing ("-")."""
        return self.path, self.settings.num_workers, self.settings.decoder if self.path == "video" else "-"


def tree_cpu() -> float:
    """CPU seconds so far of this process (all threads) and of its live descendants (Linux /proc)."""
    total, pending = time.process_time(), [os.getpid()]
    while pending:
        for children in Path(f"/proc/{pending.pop()}/task").glob("*/children"):
            try:
                for child in children.read_text().split():
                    fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
                    total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
                    pending.append(int(child))
            except (FileNotFoundError, ProcessLookupError):
                continue  # a process that ended meanwhile
    return total


# ---------------------------------------------------------------------------------------------
# Inputs


def textured_clip(side: int, frames: int, seed: int) -> np.ndarray:
    """(F, side, side, 3) uint8: a coarse noise texture panning over a drifting colour gradient."""
    rng = np.random.default_rng(seed)
    step = 3  # pixels the texture moves per frame
    coarse = rng.integers(0, 256, (side // 8 + 1, (side + step * frames) // 8 + 1, 3), dtype=np.uint8)
    texture = np.repeat(np.repeat(coarse, 8, axis=0), 8, axis=1)[:side].astype(np.float32)
    ys, xs = np.mgrid[0:side, 0:side].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 3)
    clip = np.empty((frames, side, side, 3), np.uint8)
    for t in range(frames):
        for c in range(3):
            gradient = 127.5 + 127.5 * np.sin(0.015 * (c + 1) * (xs + ys) + phase[c] + 0.2 * t)
            panned = texture[:, step * t : step * t + side, c]
            clip[t, ..., c] = (0.5 * gradient + 0.5 * panned).astype(np.uint8)
    return clip


def write_video_shards(folder: Path, side: int, frames: int, count: int, per_shard: int) -> Path:
    """`count` textured clips as webdataset tars (KEY.mp4, KEY.json) under `folder`; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    for first in range(0, count, per_shard):
        samples = []
        for index in range(first, min(first + per_shard, count)):
            meta = {"caption": f"textured clip {index}", "width": side, "height": side,
                    "num_frames": frames, "fps": FPS}  # fmt: skip
            samples.append({
                "__key__": f"clip{index:06d}",
                "mp4": encode_mp4(textured_clip(side, frames, index), fps=FPS),
                "json": json.dumps(meta).encode(),
            })  # fmt: skip
        write_shard(folder / f"shard-{first // per_shard:06d}.tar", samples)
    return folder


def write_latent_shards(
    folder: Path, shape: tuple[int, int, int, int], bucket: str, count: int, per_shard: int
) -> Path:
    """`count` float16 latents as webdataset tars (KEY.latent.npy, KEY.json) under `folder`; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for first in range(0, count, per_shard):
        samples = []
        for index in range(first, min(first + per_shard, count)):
            buffer = io.BytesIO()
            np.save(buffer, rng.standard_normal(shape, dtype=np.float32).astype(np.float16))
            meta = {"caption": f"latent sample {index}", "bucket": bucket}
            samples.append(
                {
                    "__key__": f"lat{index:06d}",
                    "latent.npy": buffer.getvalue(),
                    "json": json.dumps(meta).encode(),
                }
            )
        write_shard(folder / f"shard-{first // per_shard:06d}.tar", samples)
    return folder


def pixel_bucket(latent_shape: tuple[int, int, int, int]) -> Bucket:
    """The pixel bucket a latent of (C, f, h, w) stands for, with 4x temporal and 8x spatial compression."""
    _, frames, height, width = latent_shape
    return Bucket(1 + (frames - 1) * 4, 8 * height, 8 * width)


# ---------------------------------------------------------------------------------------------
# The bare side


def raw_samples(shards: list[str], part: int = 0, parts: int = 1) -> Iterator[dict[str, bytes]]:
    """Members (extension -> bytes) of every sample in tar order, endlessly; only every `parts`-th
    sample from `part` is read (the others' headers are passed over)."""
    index = -1
    while True:
        for shard in shards:
            with tarfile.open(shard, mode="r:") as tar:
                key, members = None, {}
                for info in tar:
                    prefix, _, extension = info.name.partition(".")
                    if prefix != key:
                        if members:
                            yield members
                        key, members, index = prefix, {}, index + 1
                    if index % parts == part:
                        members[extension] = tar.extractfile(info).read()
                if members:
                    yield members


def centred_indices(num_frames: int, frames: int, stride: int) -> list[int]:
    """`frames` indices `stride` apart from the middle of a video (the loader's `window=center`)."""
    span = (frames - 1) * stride + 1
    start = (num_frames - span) // 2
    return list(range(start, start + span, stride))


def bare_decord(data: bytes, frames: int, stride: int) -> np.ndarray:
    """decord's own calls for the centred frames."""
    import decord

    reader = decord.VideoReader(io.BytesIO(data), num_threads=1)
    pixels = reader.get_batch(centred_indices(len(reader), frames, stride)).asnumpy()
    del reader
    return pixels


def bare_torchcodec(data: bytes, frames: int, stride: int) -> np.ndarray:
    """torchcodec's own calls for the centred frames (exact seeks, one FFmpeg thread, on the CPU)."""
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(
        data, seek_mode="exact", dimension_order="NHWC", num_ffmpeg_threads=1, device="cpu"
    )
    return decoder.get_frames_at(centred_indices(decoder.metadata.num_frames, frames, stride)).data.numpy()


def bare_pyav(data: bytes, frames: int, stride: int) -> np.ndarray:
    """PyAV's own calls for the centred frames: decode from the start to the last one, on one thread."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.thread_count = 1
        wanted = centred_indices(stream.frames, frames, stride)
        kept = []
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted:
                kept.append(frame.to_ndarray(format="rgb24"))
            if index == wanted[-1]:
                break
    return np.stack(kept)


BARE_DECODE = {"decord": bare_decord, "torchcodec": bare_torchcodec, "pyav": bare_pyav}


def bare_item(path: str, decoder: str, frames: int, stride: int, sample: dict[str, bytes]) -> None:
    """The bare side's work on one read sample: the decoder's own decode for videos, nothing for latents."""
    if path == "video":
        BARE_DECODE[decoder](sample["mp4"], frames, stride)


def bare_share(
    path: str,
    decoder: str,
    shards: list[str],
    frames: int,
    stride: int,
    warmup: int,
    count: int,
    part: int,
    parts: int,
) -> Iterator[None]:
    """Warm up on `warmup` samples, yield once, then process `count` samples (this part's share)."""
    stream = raw_samples(shards, part, parts)
    for _ in range(warmup):
        bare_item(path, decoder, frames, stride, next(stream))
    yield
    for _ in range(count):
        bare_item(path, decoder, frames, stride, next(stream))


def _bare_process(args: tuple, barrier: Any, done: Any) -> None:
    """A spawned bare-side process: warm up, wait for the others, work, report its CPU seconds."""
    steps = bare_share(*args)
    next(steps)
    barrier.wait()
    cpu = time.process_time()
    for _ in steps:
        pass
    done.put(time.process_time() - cpu)


def run_bare(case: Case, frames: int, stride: int, warmup: int) -> Run:
    """The bare side of a case: in this process, or split over `case.processes` spawned processes."""
    path, decoder, shards, parts = case.path, case.settings.decoder, case.shards, case.processes
    if parts == 1:
        steps = bare_share(path, decoder, shards, frames, stride, warmup, case.samples, 0, 1)
        next(steps)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in steps:
            pass
        return Run(case.samples, time.perf_counter() - wall, time.process_time() - cpu)
    context = multiprocessing.get_context("spawn")
    barrier, done = context.Barrier(parts + 1), context.Queue()
    shares = [len(range(part, case.samples, parts)) for part in range(parts)]
    processes = [
        context.Process(
            target=_bare_process,
            args=((path, decoder, shards, frames, stride, warmup, shares[part], part, parts), barrier, done),
        )
        for part in range(parts)
    ]
    for process in processes:
        process.start()
    barrier.wait()
    wall = time.perf_counter()
    cpu = sum(done.get() for _ in processes)
    wall = time.perf_counter() - wall
    for process in processes:
        process.join()
    return Run(case.samples, wall, cpu)


# ---------------------------------------------------------------------------------------------
# The loader side


def run_loader(case: Case) -> Run:
    """Batches from a fresh `VideoLoader` (index cached): warm-up batches, then `case.samples` samples."""
    loader = VideoLoader([case.shards], case.settings)
    batches = iter(loader)
    try:
        for _ in range(case.warmup_batches):
            next(batches)
        samples = 0
        wall, cpu = time.perf_counter(), tree_cpu()
        while samples < case.samples:
            samples += len(next(batches)["key"])
        wall, cpu = time.perf_counter() - wall, tree_cpu() - cpu
    finally:
        batches.close()  # stops the decode workers
    if loader.skip_counts():
        raise RuntimeError(f"the loader skipped samples: {loader.skip_counts()}")
    return Run(samples, wall, cpu)


def index_build(shards: list[str], settings: LoaderSettings) -> tuple[float, float]:
    """Seconds to construct a loader into an empty index cache, then again from the cache."""
    assert settings.cache_dir is not None
    shutil.rmtree(settings.cache_dir, ignore_errors=True)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        VideoLoader([shards], settings)
        times.append(time.perf_counter() - start)
    return times[0], times[1]


# ---------------------------------------------------------------------------------------------
# Per-sample breakdown of the loader's work


VIDEO_STAGES = (
    "read byte range, split tar members, parse json",
    "decode (centred window)",
    "resize + crop to the bucket (fit_frames)",
    "collate: stack uint8 frames",
)
LATENT_STAGES = (
    "read byte range, split tar members, parse json",
    "latent_of: load_npy of the .npy member",
    "latent_of: finite check (all_finite)",
    "collate: stack",
)


def sample_members(index: ShardSetIndex, sample: int) -> tuple[dict, dict[str, bytes]]:
    """(metadata, members) of one indexed sample, read the loader's way."""
    _, members = split_members(read_range(*index.sample_range(sample)))
    meta, _ = read_captioned(members)
    return meta, members


def median_laps(stages: tuple[str, ...], clocks: list[list[float]]) -> dict[str, float]:
    """Median milliseconds of each stage, from per-sample lists of CPU clock readings (first sample left out)."""
    laps = [[1000 * (b - a) for a, b in itertools.pairwise(clock)] for clock in clocks[1:]]
    return {stage: statistics.median(lap[i] for lap in laps) for i, stage in enumerate(stages)}


def video_breakdown(shards: list[str], settings: LoaderSettings) -> dict[str, float]:
    """Median CPU milliseconds per clip of each stage of the loader's video path, in this process."""
    index = build_index(shards, settings.cache_dir)
    bucket, batch = settings.table.buckets[0], settings.batch_sizes[0]
    spec = ClipSpec(bucket.frames, settings.table.stride, bucket.height, bucket.width, "center")
    clocks = []
    for sample in [0, *range(len(index))]:  # the first clip twice: a warm-up
        clock = [time.process_time()]
        meta, members = sample_members(index, sample)
        clock.append(time.process_time())
        rng = np.random.default_rng(0)  # unused: the window is centred
        frames = decode_frames(members["mp4"], spec, rng, None, int(meta["num_frames"]), settings.decoder)
        clock.append(time.process_time())
        clip = fit_frames(frames, bucket.height, bucket.width).numpy()
        clock.append(time.process_time())
        torch.from_numpy(np.stack([clip] * batch))
        clock.append(clock[-1] + (time.process_time() - clock[-1]) / batch)  # this clip's share
        clocks.append(clock)
    return median_laps(VIDEO_STAGES, clocks)


def latent_breakdown(shards: list[str], settings: LoaderSettings, limit: int = 512) -> dict[str, float]:
    """Median CPU milliseconds per sample of each stage of the loader's latent path (`latent_of`'s steps)."""
    index = build_index(shards, settings.cache_dir)
    batch = settings.batch_sizes[0]
    clocks = []
    for sample in [0, *range(min(limit, len(index)))]:
        clock = [time.process_time()]
        _, members = sample_members(index, sample)
        clock.append(time.process_time())
        latent = load_npy(members[LATENT_MEMBER])
        clock.append(time.process_time())
        assert all_finite(latent)
        clock.append(time.process_time())
        torch.from_numpy(np.stack([latent] * batch))
        clock.append(clock[-1] + (time.process_time() - clock[-1]) / batch)  # this sample's share
        clocks.append(clock)
    return median_laps(LATENT_STAGES, clocks)


def print_breakdown(title: str, breakdown: dict[str, float]) -> None:
    """One breakdown as a Markdown table, with the sum."""
    total = sum(breakdown.values())
    print(f"\n| {title} | ms | share |")
    print("|---|---|---|")
    for stage, ms in breakdown.items():
        print(f"| {stage} | {ms:.2f} | {100 * ms / total:.0f} % |")
    print(f"| **sum** | **{total:.2f}** | |")


# ---------------------------------------------------------------------------------------------
# Report


def environment(decoders: list[str]) -> str:
    """One line: machine and library versions."""
    modules = {"decord": "decord", "torchcodec": "torchcodec", "pyav": "av"}
    versions = ", ".join(f"{name} {importlib.import_module(modules[name]).__version__}" for name in decoders)
    return machine.environment(
        f"torch {torch.__version__} ({torch.get_num_threads()} intra-op threads here), {versions}, "
        f"numpy {np.__version__}"
    )


def shard_mb(shards: list[str]) -> float:
    """Total size of the shards in MiB."""
    return sum(Path(s).stat().st_size for s in shards) / 2**20


Results = dict[tuple[str, int, str], tuple[list[Run], list[Run]]]


def print_results(results: Results) -> None:
    """The comparison table, Markdown: medians over the repeats; ratios are medians of paired runs."""
    print("\n| path | decoder | decode processes (loader workers) | samples timed | loader samples/s "
          "| bare samples/s | ratio (wall) | CPU ms per sample, loader / bare | ratio (CPU) | target "
          "| met (wall / CPU) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (path, workers, decoder), (loader, bare) in results.items():
        pairs = list(zip(loader, bare, strict=True))
        wall = statistics.median(a.rate / b.rate for a, b in pairs)
        cpu = statistics.median(b.cpu_ms / a.cpu_ms for a, b in pairs)
        met = " / ".join("yes" if ratio >= TARGETS[path] else "**no**" for ratio in (wall, cpu))
        print(
            f"| {path} | {decoder} | {max(1, workers)} ({workers}) | {loader[0].samples} "
            f"| {statistics.median(r.rate for r in loader):.1f} | {statistics.median(r.rate for r in bare):.1f} "
            f"| **{wall:.2f}** | {statistics.median(r.cpu_ms for r in loader):.2f} / "
            f"{statistics.median(r.cpu_ms for r in bare):.2f} | {cpu:.2f} | {TARGETS[path]} | {met} |"
        )


def print_decoders(results: Results, decoders: list[str]) -> None:
    """Each decoder's loader runs over the first decoder's from the same repeats, Markdown."""
    first = decoders[0]
    print(f"\n| decoder | decode processes (loader workers) | loader clips/s | ratio to {first} (wall) "
          f"| CPU ms per clip | ratio to {first} (CPU) | bare clips/s | bare ratio to {first} (wall) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for (path, workers, decoder), (loader, bare) in results.items():
        if path != "video":
            continue
        base_loader, base_bare = results[(path, workers, first)]
        wall = statistics.median(a.rate / b.rate for a, b in zip(loader, base_loader, strict=True))
        cpu = statistics.median(b.cpu_ms / a.cpu_ms for a, b in zip(loader, base_loader, strict=True))
        bare_wall = statistics.median(a.rate / b.rate for a, b in zip(bare, base_bare, strict=True))
        print(
            f"| {decoder} | {max(1, workers)} ({workers}) | {statistics.median(r.rate for r in loader):.1f} "
            f"| **{wall:.2f}** | {statistics.median(r.cpu_ms for r in loader):.2f} | {cpu:.2f} "
            f"| {statistics.median(r.rate for r in bare):.1f} | {bare_wall:.2f} |"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--size", type=int, default=256, help="side of the square clips; 0: the demo corpus (default 256)")
    add("--source-frames", type=int, default=33, help="frames per test clip (default 33; not with --size 0)")
    add("--videos", type=int, default=48, help="clips written (default 48)")
    add("--frames", type=int, default=None, help="frames per loaded clip (default 17; 8 with --size 0)")
    add("--stride", type=int, default=2, help="source frames between loaded frames (default 2)")
    add("--bucket-side", type=int, default=None, help="bucket height = width (default 224; 64 with --size 0)")
    add("--batch", type=int, default=4, help="video batch size (default 4)")
    add("--video-samples", type=int, default=48, help="clips timed on each side (default 48)")
    add("--latents", type=int, default=1024, help="latent samples written (default 1024)")
    add("--latent-shape", type=str, default="16,5,32,32", help="C,f,h,w of a latent (default 16,5,32,32)")
    add("--latent-batch", type=int, default=16, help="latent batch size (default 16)")
    add("--latent-samples", type=int, default=2048, help="latents timed on each side (default 2048)")
    add("--per-shard", type=int, default=8, help="video clips per shard (default 8; latents: 16x that)")
    add("--warmup", type=int, default=2, help="warm-up batches of each side (default 2)")
    add("--workers", type=int, nargs="+", default=[0, 2], help="loader worker counts (default 0 2)")
    add("--decoders", nargs="+", choices=AUTO_ORDER, default=None,
        help="video decoders to compare, the first is the reference (default: every one installed)")  # fmt: skip
    add("--repeats", type=int, default=5, help="runs of each comparison; median (default 5)")
    add("--torch-threads", type=int, default=1, help="torch intra-op threads in this process (default 1)")
    add("--workdir", type=Path, default=None, help="where shards and caches go (default: temp)")
    add("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    args.frames = args.frames or (17 if args.size else 8)
    args.bucket_side = args.bucket_side or (224 if args.size else 64)
    args.latent_shape = tuple(int(n) for n in args.latent_shape.split(","))
    args.decoders = [resolve_decoder(name, "--decoders") for name in args.decoders or installed_decoders()]
    counts = (args.videos, args.batch, args.video_samples, args.latents, args.latent_batch, args.per_shard)
    if min(counts) < 1 or min(args.workers) < 0 or args.repeats < 1 or len(args.latent_shape) != 4:
        parser.error("counts and sizes must be >= 1, --workers >= 0, --latent-shape four integers")
    span = (args.frames - 1) * args.stride + 1
    if span > (args.source_frames if args.size else 16):
        parser.error(f"{args.frames} frames at stride {args.stride} need {span} source frames")
    return args


def run_comparisons(cases: list[Case], args: argparse.Namespace) -> tuple[Results, int, int]:
    """Every case's loader and bare runs, all cases once per repeat (interleaved); the results and
    the machine's stolen and total CPU ticks meanwhile."""
    results: Results = {case.key: ([], []) for case in cases}
    stolen, ticks = machine.steal_jiffies()
    for repeat in range(args.repeats):
        for case in cases:
            batch = case.settings.batch_sizes[0]
            loader = run_loader(case)
            bare = run_bare(case, args.frames, args.stride, case.warmup_batches * batch)
            loader_runs, bare_runs = results[case.key]
            loader_runs.append(loader)
            bare_runs.append(bare)
            print(f"  repeat {repeat + 1}, {case.path}, {case.key[2]}, {case.settings.num_workers} workers: "
                  f"loader {loader.rate:.1f}/s, bare {bare.rate:.1f}/s, ratio {loader.rate / bare.rate:.2f} "
                  f"(CPU {bare.cpu_ms / loader.cpu_ms:.2f})", flush=True)  # fmt: skip
    stolen_now, ticks_now = machine.steal_jiffies()
    return results, stolen_now - stolen, ticks_now - ticks


def main(argv: list[str] | None = None) -> int:
    """Write the shards, time the index builds, run the comparisons, print the tables."""
    args = parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    names = ["videos", "corpus", "latents", "cache_video", "cache_latent"]
    with scratch_dir(args.workdir, args.keep, "loader_throughput-", names) as root:
        start = time.perf_counter()
        if args.size:
            video_dir = write_video_shards(
                root / "videos", args.size, args.source_frames, args.videos, args.per_shard
            )
            described = f"{args.size}x{args.size}, {args.source_frames} frames at {FPS} fps, textured"
        else:
            generate_corpus(
                root / "corpus", num_train=args.videos, num_val=8, seed=0, samples_per_shard=args.per_shard
            )
            video_dir = root / "corpus" / "train"
            described = "the demo's synthetic corpus (54-96 px sides, 16-20 frames at 8 fps)"
        latent_bucket = pixel_bucket(args.latent_shape)
        bucket_name = latent_bucket.name
        latent_dir = write_latent_shards(
            root / "latents", args.latent_shape, bucket_name, args.latents, 16 * args.per_shard
        )
        print(f"inputs written in {time.perf_counter() - start:.1f}s (not timed below)", flush=True)
        video_shards, latent_shards = resolve_shards(str(video_dir)), resolve_shards(str(latent_dir))
        video_table = BucketTable((Bucket(args.frames, args.bucket_side, args.bucket_side),), args.stride)
        latent_table = BucketTable((latent_bucket,), 1)
        video_settings = LoaderSettings(
            video_table,
            (args.batch,),
            seed=0,
            shuffle_window=64,
            window="center",
            cache_dir=root / "cache_video",
        )
        latent_settings = LoaderSettings(
            latent_table, (args.latent_batch,), seed=0, shuffle_window=64, window="center",
            latent_shapes=(args.latent_shape,), cache_dir=root / "cache_latent",
        )  # fmt: skip
        builds = {
            "video": (video_shards, index_build(video_shards, video_settings)),
            "latent": (latent_shards, index_build(latent_shards, latent_settings)),
        }
        cases = [
            Case(path, shards, replace(settings, num_workers=workers, decoder=decoder), args.warmup, samples,
                 max(1, workers))
            for path, shards, settings, samples, decoders in (
                ("video", video_shards, video_settings, args.video_samples, args.decoders),
                ("latent", latent_shards, latent_settings, args.latent_samples, args.decoders[:1]),
            )
            for workers in args.workers
            for decoder in decoders
        ]  # fmt: skip
        results, stolen, ticks = run_comparisons(cases, args)
        breakdowns = {
            f"loader CPU ms per clip, in this process, {decoder}": video_breakdown(
                video_shards, replace(video_settings, decoder=decoder)
            )
            for decoder in args.decoders
        }
        breakdowns["loader CPU ms per latent, in this process"] = latent_breakdown(
            latent_shards, latent_settings
        )

        print(f"\nenvironment: {environment(args.decoders)}")
        print(f"CPU time the hypervisor took (steal) during the comparisons: {100 * stolen / ticks:.0f} %")
        print(f"videos: {len(video_shards)} shards, {args.videos} clips ({described}), "
              f"{shard_mb(video_shards) / args.videos:.2f} MiB per clip; loaded as bucket "
              f"{video_table.buckets[0].name} at stride {args.stride}, batch {args.batch}")  # fmt: skip
        print(f"latents: {len(latent_shards)} shards, {args.latents} samples {args.latent_shape} float16 "
              f"({shard_mb(latent_shards) / args.latents * 1024:.0f} KiB each), bucket {bucket_name}, "
              f"batch {args.latent_batch}")  # fmt: skip
        print_results(results)
        print_decoders(results, args.decoders)
        print("\n| shard set | shards | MiB | index build, empty cache (s) | index build, cached (s) |")
        print("|---|---|---|---|---|")
        for path, (shards, (first, cached)) in builds.items():
            print(f"| {path} | {len(shards)} | {shard_mb(shards):.1f} | {first:.3f} | {cached:.3f} |")
        for title, breakdown in breakdowns.items():
            print_breakdown(title, breakdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
