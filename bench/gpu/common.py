"""What the steps of bench/gpu share: arguments, the JSON each writes, timing, SDPA kernel names and
the `train.attention_backend` choices.

Every step is a script with `--device cuda|cpu` and `--out FILE.json`; it writes one JSON object
with `step`, `status` ("ok" or "failed"), `device`, `seconds`, `error` (the traceback's last lines
when it failed) and its figures, and exits 1 when it failed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import statistics
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

# `train.attention_backend` values: auto (the project's choice per device) and one kernel each.
CHOICES = ("auto", "cudnn", "flash", "efficient", "math")
KERNELS = ("cudnn", "flash", "efficient", "math")

# torch's SDPA kernels as the profiler names their forward ops -> the backend name.
KERNEL_OPS = {
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
}


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every step takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where to measure")
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    return parser


def run_step(name: str, device: str, out: Path, measure: Callable[[], dict[str, Any]]) -> int:
    """Run `measure`, write its figures (or the error) to `out` with the common fields; 0 or 1."""
    started, clock = datetime.datetime.now(datetime.timezone.utc), time.perf_counter()
    record: dict[str, Any] = {
        "step": name,
        "device": device,
        "started": started.isoformat(timespec="seconds"),
    }
    try:
        record.update(measure())
        record.setdefault("status", "ok")
        record["error"] = None
    except Exception:  # any failure is the step's result: recorded, then the exit status says so
        record.update(status="failed", error=traceback.format_exc()[-4000:])
        print(record["error"])
    record["seconds"] = round(time.perf_counter() - clock, 2)
    write_json(out, record)
    return 0 if record["status"] == "ok" else 1


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write `data` as indented JSON, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def device_of(name: str) -> torch.device:
    """The device a step measures on; fails early when CUDA is asked for and absent."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "--device cuda, but torch sees no CUDA device (DEVICE=cpu runs the CPU smoke mode)"
        )
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of `fn` after `warmup` calls (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        else:
            clock = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - clock)
    return seconds


def median(values: Sequence[float]) -> float:
    """The median of a non-empty sequence."""
    return float(statistics.median(values))


def dispatched_kernels(fn: Callable[[], object]) -> list[str]:
    """The SDPA kernels (by backend name) that one call of `fn` ran, read off the profiler's ops."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sorted({KERNEL_OPS[event.name] for event in prof.events() if event.name in KERNEL_OPS})


def project_kernels(choice: str, device: torch.device) -> tuple | None:
    """The SDPA kernels `train.attention_backend=choice` allows on `device`, in priority order, as
    the project resolves them (raises ValueError for a kernel the device lacks)."""
    from sora_train.parallel.attention_backend import resolve_attention_backend

    return tuple(resolve_attention_backend(choice, device))


@contextlib.contextmanager
def model_backend(model: torch.nn.Module, choice: str, device: torch.device) -> Iterator[str]:
    """`train.attention_backend=choice` on `model` while the context lasts, applied as the trainer
    applies it (`parallel.attention_backend.apply_attention_backend`); yields the kernels."""
    from sora_train.parallel.attention_backend import apply_attention_backend

    layout = model.dit.layout
    before = layout.backends
    apply_attention_backend(model, choice, device)
    try:
        yield ", ".join(kernel_names(layout.backends))
    finally:
        layout.backends = before


def kernel_names(kernels: Sequence) -> list[str]:
    """The names of a kernel list, whether the project gives them as names or as torch's enum."""
    return [str(getattr(kernel, "name", kernel)) for kernel in kernels]


def gib(n: float | None) -> float | None:
    """Bytes in GiB, rounded; None stays None."""
    return None if n is None else round(n / 2**30, 3)
