"""Save and load throughput of the trainer's checkpoints against a raw write and read of the same bytes.

One process (a 1-rank gloo group), ZeRO stage `--zero-stage` (default 2, as in training), fp32.
A denoiser of `--hidden` x `--depth` is wrapped in its DeepSpeed engine and takes one AdamW step on
random inputs, so the optimizer moments exist. Then, on the same disk, side by side:

* **save**: `save_checkpoint` exactly as the trainer's `save()` calls it (rank state with the RNG
  states, a trainer state with the config, EMA weights, the inference config): DeepSpeed writes its
  model and optimizer files into a staging directory, the EMA weights, rank and trainer state and
  config follow, every file is fsynced and CRC-32-checksummed, the manifest is written and the
  directory renamed into place. Against a **raw write**: as many files of the same sizes, each
  `open(..., "wb").write()` of a slice of one preallocated buffer of random bytes, then `os.fsync`.
* **load**: what a resume does: `verify_checkpoint` (re-reads and checksums every file),
  `load_engine_state` (DeepSpeed's `load_checkpoint` under weights-only `torch.load`),
  `safetensors.torch.load_file` of the EMA weights into `EMA.load_state_dict`, and `read_rank_state`.
  Against a **raw read**: `open(..., "rb").read()` of each raw file.

Bytes are the sum of the committed checkpoint's file sizes (the manifest included); MB/s counts
10^6 bytes per wall second. Both sides are treated alike regarding the page cache: after the writes
(all fsynced) the pages of every checkpoint file and every raw file are dropped with
`posix_fadvise(POSIX_FADV_DONTNEED)` before either read side is timed, so both reads start from
the disk; `mincore` then counts the pages still resident, which is printed (0 % when the drop
worked). A resume reads each file twice, once for its checksum (from the disk) and once for the load
(from the page cache the checksum just filled); the raw read reads each file once.

Then the time the training loop is blocked by a save, with the commit inline (the save returns
once committed) and in the background (`checkpoint.async_commit`, the default: the save returns
once the files are written; fsync, checksums and commit run on a thread), interleaved over the
same number of repeats, with the time until the checkpoint is committed beside it.

Each repeat runs checkpoint save, raw write, (drop), checkpoint load, raw read, each into or from
files the repeat wrote (the previous repeat's are deleted first, not timed); every figure is the median over `--repeats`, every ratio the median of
the paired ratios. Target: checkpoint / raw >= 0.5 for save and for load. Breakdowns show where the
checkpoint's time goes (each stage's seconds exclude the timed stages it calls; "rest" is what no
stage covers), with the raw side's split beside them. Wall times count what else the machine did
(on a VM, the CPU time the hypervisor takes, "steal", is printed); CPU seconds are this process'
(all threads). Linux only (/proc, posix_fadvise, mincore).

    python bench/checkpoint_throughput.py [--hidden 512] [--depth 10] [--heads 8] [--zero-stage 2]
        [--repeats 3] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import mmap
import os
import shutil
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import deepspeed
import machine  # bench/machine.py and bench/scratch.py: the script's own directory is on sys.path
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from scratch import scratch_dir

from sora_train.checkpoint import resuming, saving
from sora_train.checkpoint.rng import capture_rng
from sora_train.checkpoint.store import CheckpointStore
from sora_train.config import TrainConfig, to_train_config
from sora_train.ema import EMA
from sora_train.loop.engine import batch_layout, training_engine
from sora_train.models.denoiser import build_denoiser, build_tokenizer
from sora_train.parallel.dist import DistInfo, init_distributed, shutdown_distributed
from sora_train.pretrained import EMA_WEIGHTS, inference_config

TARGET = 0.5
STEP = 1
LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.mmap.restype = ctypes.c_void_p
LIBC.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, *[ctypes.c_int] * 3, ctypes.c_long]
LIBC.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
LIBC.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]


@dataclass(frozen=True)
class Run:
    """One timed save, load, write or read: bytes moved, wall and CPU seconds, seconds per stage."""

    nbytes: int
    wall: float
    cpu: float
    stages: dict[str, float]

    @property
    def mb_s(self) -> float:
        """10^6 bytes per wall second."""
        return self.nbytes / self.wall / 1e6


class StageClock:
    """Wall seconds spent in labelled functions; a stage's seconds exclude the labelled stages it calls."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._inner: list[float] = []  # per open stage: seconds of the labelled stages inside it

    def wrap(self, label: str, function: Callable) -> Callable:
        """`function`, timed under `label`."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            self._inner.append(0.0)
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                self.seconds[label] += elapsed - self._inner.pop()
                if self._inner:
                    self._inner[-1] += elapsed

        return timed

    @contextlib.contextmanager
    def patched(self, targets: list[tuple[Any, str, str]]) -> Iterator[None]:
        """Within the block, every call of each (owner, attribute) is timed under its label."""
        originals = [(owner, name, getattr(owner, name)) for owner, name, _ in targets]
        for owner, name, label in targets:
            setattr(owner, name, self.wrap(label, getattr(owner, name)))
        try:
            yield
        finally:
            for owner, name, original in originals:
                setattr(owner, name, original)


def timed_run(clock: StageClock, nbytes: int, work: Callable[[], None]) -> Run:
    """Run `work` with wall and CPU clocks; the stages are what `clock` recorded meanwhile."""
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    stages = dict(clock.seconds)
    stages["rest"] = wall - sum(stages.values())
    return Run(nbytes, wall, cpu, stages)


# ---------------------------------------------------------------------------------------------
# Page cache


def drop_cached(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache (they are clean: every file was fsynced)."""
    for path in paths:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def resident_fraction(paths: list[Path]) -> float:
    """Fraction of the files' pages that are in the page cache (`mincore` of a mapping; reads nothing)."""
    resident = total = 0
    for path in paths:
        size = path.stat().st_size
        if not size:
            continue
        pages = -(-size // mmap.PAGESIZE)
        vector = (ctypes.c_ubyte * pages)()
        descriptor = os.open(path, os.O_RDONLY)
        try:
            address = LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, descriptor, 0)
            if address in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
            try:
                if LIBC.mincore(address, size, vector):
                    raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
            finally:
                LIBC.munmap(address, size)
        finally:
            os.close(descriptor)
        resident += sum(byte & 1 for byte in vector)
        total += pages
    return resident / max(1, total)


def files_of(directory: Path) -> list[Path]:
    """Every regular file under `directory`, sorted."""
    return sorted(path for path in directory.rglob("*") if path.is_file())


# ---------------------------------------------------------------------------------------------
# The checkpoint side


def bench_config(hidden: int, depth: int, heads: int, zero_stage: int, run_dir: Path) -> TrainConfig:
    """A training config with the default model settings at this size, and small 4 x 16 x 16 clips."""
    overrides = {
        "model": {"preset": "bench", "hidden_size": hidden, "depth": depth, "num_heads": heads},
        "data": {"train": "unused", "num_frames": 4, "height": 16, "width": 16},
        "parallel": {"zero_stage": zero_stage},
        "run_dir": str(run_dir),
    }
    return to_train_config(OmegaConf.create(overrides))


def stepped_engine(cfg: TrainConfig, dist_info: DistInfo) -> Any:
    """The DeepSpeed engine of a fresh denoiser after one optimizer step on random inputs."""
    torch.manual_seed(0)
    engine = training_engine(build_denoiser(cfg.model), cfg, batch_layout(cfg, dist_info.data_world))
    data = cfg.data
    x = torch.randn(1, 3, data.num_frames, data.height, data.width)
    ids, mask = build_tokenizer(cfg.model)(["a red square moving right"])
    loss = engine(x, torch.rand(1), ids, mask).square().mean()
    engine.backward(loss)
    engine.step()
    return engine


def save_arguments(engine: Any, cfg: TrainConfig, dist_info: DistInfo, ema: EMA) -> tuple:
    """`save_checkpoint`'s positional arguments, as the trainer passes them, into an emptied run dir."""
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    rank_state = {"rng": capture_rng()}
    trainer_state = {"world_size": dist_info.world_size, "grad_accum_steps": cfg.train.grad_accum_steps,
                     "ema_updates": ema.updates, "config": asdict(cfg)}  # fmt: skip
    weights = ema.state_dict()
    return engine, cfg.run_dir, dist_info, STEP, rank_state, trainer_state, weights, inference_config(cfg)


def save_once(engine: Any, cfg: TrainConfig, dist_info: DistInfo, ema: EMA) -> tuple[Run, Path]:
    """One timed `save_checkpoint` into an empty run directory; returns the run and the checkpoint."""
    arguments = save_arguments(engine, cfg, dist_info, ema)
    clock, saved = StageClock(), []
    stages = [
        (type(engine), "save_checkpoint", "DeepSpeed save_checkpoint: model + optimizer files (page cache)"),
        (saving, "save_weights", "EMA weights: safetensors save_file (page cache)"),
        (saving, "describe_files", "fsync + CRC-32 of every file (threads; re-read from the page cache)"),
        (saving, "write_manifest", "manifest, rename into place, `latest`"),
        (CheckpointStore, "commit", "manifest, rename into place, `latest`"),
    ]

    def work() -> None:
        saved.append(saving.save_checkpoint(*arguments, keep_last=0, keep_every=0).wait())

    with clock.patched(stages):
        run = timed_run(clock, 0, work)
    directory = saved[0]
    return replace(run, nbytes=sum(path.stat().st_size for path in files_of(directory))), directory


def load_once(engine: Any, ema: EMA, directory: Path, nbytes: int) -> Run:
    """One timed resume of `directory` into `engine` and `ema`: verify, DeepSpeed load, EMA weights, rank state."""
    clock = StageClock()
    stages = [
        (resuming, "file_problems", "verify: sizes + CRC-32 of every file (threads; from the disk)"),
        (torch, "load", "DeepSpeed load: torch.load of its files, weights-only (and of the rank file)"),
    ]
    verify = clock.wrap("verify: manifest and the file list", resuming.verify_checkpoint)
    load_engine = clock.wrap(
        "DeepSpeed load: the rest (copy into model and optimizer)", resuming.load_engine_state
    )
    load_ema = clock.wrap(
        "EMA weights: safetensors load_file, EMA.load_state_dict",
        lambda path: ema.load_state_dict(load_file(path), ema.updates),
    )

    def work() -> None:
        problems = verify(directory)
        if problems:
            raise RuntimeError(f"the checkpoint does not verify: {problems}")
        load_engine(engine, directory)
        load_ema(str(directory / EMA_WEIGHTS))
        resuming.read_rank_state(directory, 0)

    with clock.patched(stages):
        return timed_run(clock, nbytes, work)


# ---------------------------------------------------------------------------------------------
# The raw side


def raw_write(folder: Path, sizes: list[int], buffer: bytes) -> tuple[Run, list[Path]]:
    """Write one file per size from `buffer`, each fsynced; returns the run and the files."""
    folder.mkdir(parents=True)
    paths = [folder / f"raw_{index:02d}.bin" for index in range(len(sizes))]
    clock = StageClock()
    view = memoryview(buffer)

    def write(handle: Any, size: int) -> None:
        handle.write(view[:size])

    timed_write = clock.wrap("write (page cache)", write)
    timed_fsync = clock.wrap("fsync (to the disk)", os.fsync)

    def work() -> None:
        for path, size in zip(paths, sizes, strict=True):
            with open(path, "wb") as handle:
                timed_write(handle, size)
                timed_fsync(handle.fileno())

    return timed_run(clock, sum(sizes), work), paths


def raw_read(paths: list[Path]) -> Run:
    """Read every file whole with plain reads."""
    clock = StageClock()

    def read(path: Path) -> None:
        with open(path, "rb") as handle:
            handle.read()

    timed_read = clock.wrap("read (from the disk)", read)

    def work() -> None:
        for path in paths:
            timed_read(path)

    return timed_run(clock, sum(path.stat().st_size for path in paths), work)


# ---------------------------------------------------------------------------------------------
# Report


def environment() -> str:
    """One line: machine and library versions."""
    return machine.environment(
        f"torch {torch.__version__} ({torch.get_num_threads()} intra-op threads), deepspeed {deepspeed.__version__}"
    )


def print_results(results: dict[str, tuple[list[Run], list[Run]]]) -> None:
    """The comparison table, Markdown: medians over the repeats; ratios are medians of paired runs."""
    print("\n| side | MB | checkpoint s | raw s | checkpoint MB/s | raw MB/s | ratio | CPU s, checkpoint / raw "
          "| target | met |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for side, (checkpoint, raw) in results.items():
        ratio = statistics.median(c.mb_s / r.mb_s for c, r in zip(checkpoint, raw, strict=True))
        print(
            f"| {side} | {checkpoint[0].nbytes / 1e6:.0f} | {statistics.median(r.wall for r in checkpoint):.2f} "
            f"| {statistics.median(r.wall for r in raw):.2f} | {statistics.median(r.mb_s for r in checkpoint):.0f} "
            f"| {statistics.median(r.mb_s for r in raw):.0f} | **{ratio:.2f}** "
            f"| {statistics.median(r.cpu for r in checkpoint):.2f} / {statistics.median(r.cpu for r in raw):.2f} "
            f"| {TARGET} | {'yes' if ratio >= TARGET else '**no**'} |"
        )


def print_breakdown(title: str, runs: list[Run]) -> None:
    """Median seconds of each stage over the runs, as a Markdown table with shares of the median wall."""
    wall = statistics.median(run.wall for run in runs)
    print(f"\n| {title} | s | share |")
    print("|---|---|---|")
    for stage in runs[0].stages:
        seconds = statistics.median(run.stages.get(stage, 0.0) for run in runs)
        print(f"| {stage} | {seconds:.2f} | {100 * seconds / wall:.0f} % |")
    print(f"| **wall** | **{wall:.2f}** | |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--hidden", type=int, default=512, help="DiT hidden size (default 512)")
    add("--depth", type=int, default=10, help="DiT blocks (default 10: 60 M parameters at --hidden 512)")
    add("--heads", type=int, default=8, help="attention heads (default 8)")
    add("--zero-stage", type=int, default=2, choices=(1, 2, 3), help="ZeRO stage (default 2)")
    add("--repeats", type=int, default=3, help="runs of each side; median (default 3)")
    add("--workdir", type=Path, default=None, help="where the checkpoints and raw files go (default: temp)")
    add("--keep", action="store_true", help="keep the work folder (and the last repeat's files)")
    args = parser.parse_args(argv)
    if min(args.hidden, args.depth, args.heads, args.repeats) < 1 or args.hidden % args.heads:
        parser.error("sizes and --repeats must be >= 1, --hidden a multiple of --heads")
    return args


def one_repeat(
    root: Path, cfg: TrainConfig, dist_info: DistInfo, engine: Any, ema: EMA
) -> tuple[dict[str, tuple[Run, Run]], tuple[float, float], Path]:
    """Checkpoint save, raw write, page drop, checkpoint load, raw read: the runs of each side, the
    fractions of checkpoint and raw pages still resident after the drop, and the checkpoint."""
    save, directory = save_once(engine, cfg, dist_info, ema)
    checkpoint_paths = files_of(directory)
    sizes = [path.stat().st_size for path in checkpoint_paths]
    shutil.rmtree(root / "raw", ignore_errors=True)
    write, raw_paths = raw_write(root / "raw", sizes, os.urandom(max(sizes)))
    drop_cached(checkpoint_paths + raw_paths)
    resident = resident_fraction(checkpoint_paths), resident_fraction(raw_paths)
    load = load_once(engine, ema, directory, save.nbytes)
    read = raw_read(raw_paths)
    return {"save": (save, write), "load": (load, read)}, resident, directory


def blocking_seconds(
    cfg: TrainConfig, dist_info: DistInfo, engine: Any, ema: EMA, background: bool
) -> tuple[float, float]:
    """Seconds until `save_checkpoint` returns (training blocked), and until the save is committed."""
    arguments = save_arguments(engine, cfg, dist_info, ema)
    start = time.perf_counter()
    pending = saving.save_checkpoint(*arguments, background=background)
    returned = time.perf_counter() - start
    pending.wait()
    return returned, time.perf_counter() - start


def print_blocking(times: dict[bool, list[tuple[float, float]]]) -> None:
    """The training loop's wait per save, with the commit inline and on a background thread."""
    print("\n| save | training blocked s | committed after s |")
    print("|---|---|---|")
    for background, label in ((False, "commit inline"), (True, "commit in the background (default)")):
        blocked = statistics.median(r for r, _ in times[background])
        committed = statistics.median(c for _, c in times[background])
        print(f"| {label} | {blocked:.2f} | {committed:.2f} |")
    inline = statistics.median(r for r, _ in times[False])
    print(f"blocking time, background / inline: {statistics.median(r for r, _ in times[True]) / inline:.2f}")


def main(argv: list[str] | None = None) -> int:
    """Build the engine, run the interleaved repeats, print the tables."""
    args = parse_args(argv)
    dist_info = init_distributed()
    try:
        with scratch_dir(args.workdir, args.keep, "checkpoint_throughput-", ["run", "raw"]) as root:
            cfg = bench_config(args.hidden, args.depth, args.heads, args.zero_stage, root / "run")
            start = time.perf_counter()
            engine = stepped_engine(cfg, dist_info)
            ema = EMA(engine.module, cfg.train.ema_decay)
            parameters = sum(
                weights.numel() for weights in ema.state_dict().values()
            )  # whole under ZeRO-3 too
            print(f"{parameters / 1e6:.1f} M parameters, engine and one step in "
                  f"{time.perf_counter() - start:.1f}s (not timed below)", flush=True)  # fmt: skip
            results: dict[str, tuple[list[Run], list[Run]]] = {"save": ([], []), "load": ([], [])}
            resident = []
            stolen, ticks = machine.steal_jiffies()
            for repeat in range(args.repeats):
                pairs, dropped, directory = one_repeat(root, cfg, dist_info, engine, ema)
                for side, (checkpoint, raw) in pairs.items():
                    results[side][0].append(checkpoint)
                    results[side][1].append(raw)
                resident.append(dropped)
                (save, write), (load, read) = pairs["save"], pairs["load"]
                print(f"  repeat {repeat + 1}: save {save.mb_s:.0f} MB/s, raw write {write.mb_s:.0f} MB/s; "
                      f"load {load.mb_s:.0f} MB/s, raw read {read.mb_s:.0f} MB/s; pages resident after the "
                      f"drop: checkpoint {100 * dropped[0]:.1f} %, raw {100 * dropped[1]:.1f} %",
                      flush=True)  # fmt: skip
            stolen, ticks = (
                now - before for now, before in zip(machine.steal_jiffies(), (stolen, ticks), strict=True)
            )

            print(f"\nenvironment: {environment()}")
            print(f"CPU time the hypervisor took (steal) during the repeats: {100 * stolen / ticks:.0f} %")
            files = files_of(directory)
            print(f"model: hidden {args.hidden}, depth {args.depth}, {parameters / 1e6:.1f} M parameters, "
                  f"ZeRO-{args.zero_stage}, fp32; checkpoint: {len(files)} files, "
                  + ", ".join(f"{path.relative_to(directory)} {path.stat().st_size / 1e6:.1f} MB"
                              for path in files))  # fmt: skip
            print(f"workdir: {root}; pages resident after the drop, max over repeats: "
                  f"checkpoint {100 * max(r[0] for r in resident):.1f} %, "
                  f"raw {100 * max(r[1] for r in resident):.1f} %")  # fmt: skip
            print_results(results)
            for side in results:
                print_breakdown(f"{side}: checkpoint stage", results[side][0])
                print_breakdown(f"{side}: raw stage", results[side][1])
            times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
            for _ in range(args.repeats):
                for background in (False, True):
                    times[background].append(blocking_seconds(cfg, dist_info, engine, ema, background))
            print_blocking(times)
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
