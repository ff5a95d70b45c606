"""Step (c) of bench/gpu: MFU of the 2B preset at 32,760 video tokens per sample on one GPU.

The run: `model=2B`, Wan latents of 21 x 60 x 104 (81 frames of 480 x 832 pixels through Wan 2.1's
VAE, taken as 16 channels; a config.json stands in for the VAE, whose weights are not needed),
patch [1, 2, 2]: 21 x 30 x 52 = 32,760 video tokens; one sample per step, bf16, DeepSpeed ZeRO-2
on 1 GPU, the EMA, and the activation checkpointing policy the planner finds fitting on this card
(none if everything fits; else the first of `fitting_policies`: selective, every_k, full).
The engine is built as the trainer builds it (`build_denoiser`, `apply_activation_checkpointing`,
`training_engine`, `EMA`, `PromptEncoder`) and each step is the trainer's own `forward_backward`,
`engine.step()` and EMA update, on latents made in memory (no data loading, no VAE).

For `train.attention_backend` auto (the default), cudnn and flash (applied to the model as the
trainer applies it), interleaved step by step after a warm-up: the median step time; MFU = the
project's FLOPs of the step (`throughput.batch_flops`, the design guide's formula) / (step time x
989 TFLOP/s), and the same against an 8192³ bf16 GEMM measured here; the peak of
`torch.cuda.max_memory_allocated` against the planner's peak. Then one step under the profiler:
the 20 kernels with the most GPU time. Targets: MFU >= 45 % of 989 TFLOP/s (H200); measured peak
within 10 % of the plan. `--device cpu` runs the same with the `tiny` preset on 3 x 8 x 8 latents.

    python bench/gpu/mfu.py --device cuda --out bench/gpu/out/mfu.json
"""

from __future__ import annotations

import importlib
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common
import torch

PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16 (the design guide's peak)
TARGET_MFU = 0.45
TARGET_MEMORY = 0.10  # |measured / planned - 1|
CHOICES = ("auto", "cudnn", "flash")
# device -> the run: overrides, GEMM size, warm-up steps, timed rounds (one step per choice each)
RUNS = {
    "cuda": (["model=2B", "data.num_frames=81", "data.height=480", "data.width=832"], 8192, 2, 3),
    "cpu": (["model=tiny", "model.patch_size=[1,2,2]", "data.num_frames=9", "data.height=64", "data.width=64"],
            512, 1, 2),
}  # fmt: skip
COMMON_OVERRIDES = [
    "model.latent_space=wan", "data=latents", "data.train=unused", "train.global_batch_size=1",
    "train.precision=bf16", "wandb.mode=disabled",
]  # fmt: skip
# Wan 2.1's VAE geometry: 16 latent channels, 4x time and 8x space compression.
WAN21_VAE = {"z_dim": 16, "dim_mult": [1, 2, 4, 4], "temperal_downsample": [False, True, True]}
CAPTION = "a red square moving left on a black background"


def compose(device: torch.device, vae: Path, policy: str | None):  # -> TrainConfig
    """The run's config; the checkpointing policy given, or the planner's for this card."""
    from sora_train.compose import compose_config

    overrides = [*COMMON_OVERRIDES, *RUNS[device.type][0], f"model.vae_path={vae}"]
    cfg = compose_config(overrides)
    policy = policy or planned_policy(cfg, gpu_type(device)[0])
    return compose_config([*overrides, f"train.activation_checkpointing={policy}"])


def gpu_type(device: torch.device) -> tuple[str, str | None]:
    """The planner's name for this card, and a note when it is taken as an H100."""
    from sora_train.hardware import match_device_name

    if device.type != "cuda":
        return "H100", "CPU smoke mode: planned as on an H100, not comparable with the CPU's memory"
    spec = match_device_name(torch.cuda.get_device_name(device))
    return (spec.name, None) if spec else ("H100", "unknown card: planned as an H100")


def planned_policy(cfg, gpu: str) -> str:  # cfg: TrainConfig
    """No checkpointing if the run fits `gpu`; else the first policy at which it does (else full)."""
    from sora_train.planning.plan import fitting_policies, plan_run

    if plan_run(cfg, 1, gpu).fits:
        return cfg.train.activation_checkpointing
    return next(iter(fitting_policies(cfg, 1, gpu)), "full")


def gemm_tflops(size: int, device: torch.device) -> float:
    """TFLOP/s of a size³ bf16 matrix product (median of 10 after 3 warm-up products)."""
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    seconds = common.median(common.time_calls(lambda: a @ b, device, warmup=3, repeats=10))
    return 2 * size**3 / seconds / 1e12


def build(cfg, device: torch.device) -> tuple[Any, Any, Any]:  # -> (engine, EMA, PromptEncoder)
    """The DeepSpeed engine, EMA and prompt encoder of a 1-process run, built as the trainer does."""
    from sora_train.ema import EMA
    from sora_train.loop.engine import batch_layout, training_engine
    from sora_train.models.denoiser import build_denoiser
    from sora_train.models.prompts import PromptEncoder
    from sora_train.parallel.checkpointing import apply_activation_checkpointing
    from sora_train.parallel.dist import init_distributed

    if device.type == "cpu":
        # One process needs no shared-memory collective: skip DeepSpeed's JIT build of it (minutes
        # and a compiler on a cold machine). `deepspeed.comm.torch` as an attribute is torch itself.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    init_distributed()
    torch.manual_seed(cfg.seed)
    with torch.device(device):  # initialised where it trains: 2B parameters are slow to draw on a CPU
        model = build_denoiser(cfg.model)
    train = cfg.train
    apply_activation_checkpointing(
        model, train.activation_checkpointing, train.activation_checkpointing_every
    )
    engine = training_engine(model, cfg, batch_layout(cfg, 1))
    return engine, EMA(engine.module, train.ema_decay), PromptEncoder(cfg.model, device)


def step_function(cfg, engine, ema, prompts, latent_grid: tuple[int, int, int]) -> Callable[[], None]:
    """One optimizer step of the trainer (`loop.step.forward_backward`, `engine.step()`, the EMA)
    on one sample of random latents of `latent_grid`."""
    from sora_train.flops import planned_latent_channels
    from sora_train.loop.step import forward_backward

    shape = (1, planned_latent_channels(cfg.model), *latent_grid)
    batch = {"x": torch.randn(shape, device=engine.device, dtype=torch.bfloat16), "caption": [CAPTION],
             "key": ["bench-0"]}  # fmt: skip
    generator = torch.Generator().manual_seed(cfg.seed)

    def step() -> None:
        forward_backward(engine, batch, prompts, None, generator, cfg, torch.bfloat16)
        engine.step()
        if engine.was_step_applied():
            ema.update(engine.module)

    return step


def timed_step(step: Callable[[], None], device: torch.device) -> tuple[float, int | None]:
    """Wall seconds of one step, and the most memory allocated during it (CUDA only)."""
    common.synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock = time.perf_counter()
    step()
    common.synchronize(device)
    seconds = time.perf_counter() - clock
    return seconds, torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def measure_choices(engine, step: Callable[[], None], device: torch.device, warmup: int, rounds: int) -> dict:
    """Per `train.attention_backend` choice: kernels, step times, peak memory (interleaved rounds)."""
    results: dict[str, dict[str, Any]] = {}
    for choice in CHOICES:  # a warm-up step under each (cuDNN builds its plans on first use)
        try:
            with common.model_backend(engine.module, choice, device) as kernels:
                for _ in range(warmup):
                    step()
            results[choice] = {"kernels": kernels, "seconds": [], "peak_bytes": None}
        except (RuntimeError, ValueError) as error:
            results[choice] = {"unavailable": str(error).strip().splitlines()[0][:300]}
    runnable = [choice for choice in CHOICES if "seconds" in results[choice]]
    for _ in range(rounds):
        for choice in runnable:
            with common.model_backend(engine.module, choice, device):
                seconds, peak = timed_step(step, device)
            row = results[choice]
            row["seconds"].append(seconds)
            row["peak_bytes"] = None if peak is None else max(peak, row["peak_bytes"] or 0)
    return results


def top_kernels(step: Callable[[], None], device: torch.device, count: int = 20) -> dict[str, Any]:
    """One profiled step: the `count` GPU kernels (CPU: ops) with the most self time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        common.synchronize(device)
    if device.type == "cuda":
        rows = [
            (e.key, e.self_device_time_total, e.count)
            for e in prof.key_averages()
            if e.device_type == DeviceType.CUDA
        ]
    else:
        rows = [(e.key, e.self_cpu_time_total, e.count) for e in prof.key_averages()]
    total = sum(row[1] for row in rows) or 1
    rows.sort(key=lambda row: -row[1])
    top = [
        {"name": name[:160], "ms": us / 1e3, "share": us / total, "calls": calls}
        for name, us, calls in rows[:count]
    ]
    return {
        "by": "GPU time" if device.type == "cuda" else "CPU self time",
        "total_ms": total / 1e3,
        "top": top,
    }


def profiled_step(engine, step: Callable[[], None], device: torch.device) -> dict[str, Any]:
    """`top_kernels` of a step under the default choice, auto."""
    with common.model_backend(engine.module, "auto", device) as kernels:
        return {"attention_backend": f"auto ({kernels})", **top_kernels(step, device)}


def figures(results: dict, step_flops: float, gemm: float, planned_peak: int, device: torch.device) -> None:
    """Add each choice's median step time, MFU (against the peak and the GEMM) and memory ratio."""
    for row in results.values():
        if not row.get("seconds"):
            continue
        seconds = common.median(row["seconds"])
        achieved = step_flops / seconds
        row.update(step_s=seconds, tflops=achieved / 1e12, mfu_vs_gemm=achieved / (gemm * 1e12))
        row["mfu_vs_989"] = achieved / PEAK_FLOPS if device.type == "cuda" else None
        peak = row.get("peak_bytes")
        row["peak_gib"], row["memory_ratio"] = common.gib(peak), peak / planned_peak if peak else None


def measure(args: Any) -> dict[str, Any]:
    """The step's figures."""
    from sora_train.planning.plan import plan_run
    from sora_train.throughput import batch_flops

    device = common.device_of(args.device)
    _, gemm_size, warmup, rounds = RUNS[device.type]
    gemm = gemm_tflops(gemm_size, device)
    with tempfile.TemporaryDirectory() as vae:
        (Path(vae) / "config.json").write_text(json.dumps(WAN21_VAE))
        cfg = compose(device, Path(vae), args.policy)
        gpu, note = gpu_type(device)
        bucket = plan_run(cfg, 1, gpu).buckets[0]
        engine, ema, prompts = build(cfg, device)
    step = step_function(cfg, engine, ema, prompts, bucket.latent_grid)
    step_flops = batch_flops(cfg, bucket.video_tokens, 1, cfg.model.text_max_length)
    results = measure_choices(engine, step, device, warmup, rounds)
    figures(results, step_flops, gemm, bucket.peak_bytes, device)
    best = max((r["mfu_vs_gemm"] for r in results.values() if "mfu_vs_gemm" in r), default=None)
    auto = results["auto"]
    return {
        "run": {"preset": cfg.model.preset, "parameters": sum(p.numel() for p in engine.module.parameters()),
                "latent_grid": list(bucket.latent_grid), "video_tokens": bucket.video_tokens,
                "text_tokens": cfg.model.text_max_length, "batch": 1, "precision": "bf16", "zero_stage": 2,
                "activation_checkpointing": cfg.train.activation_checkpointing, "planned_as": gpu, "note": note},
        "step_flops": step_flops, "gemm": {"size": gemm_size, "tflops": gemm}, "peak_flops": PEAK_FLOPS,
        "planned_peak_gib": common.gib(bucket.peak_bytes), "backends": results, "best_mfu_vs_gemm": best,
        "profile": profiled_step(engine, step, device),
        "targets": {"mfu_vs_989": TARGET_MFU, "memory_within": TARGET_MEMORY,
                    "mfu_met": None if auto.get("mfu_vs_989") is None else auto["mfu_vs_989"] >= TARGET_MFU,
                    "memory_met": None if auto.get("memory_ratio") is None
                    else abs(auto["memory_ratio"] - 1) <= TARGET_MEMORY},
    }  # fmt: skip


def main() -> int:
    """Parse the arguments, measure, write the JSON."""
    parser = common.parser(__doc__.split("\n\n")[0])
    parser.add_argument("--policy", choices=("none", "selective", "every_k", "full"),
                        help="activation checkpointing (default: what the planner finds fitting)")  # fmt: skip
    args = parser.parse_args()
    return common.run_step("mfu", args.device, args.out, lambda: measure(args))


if __name__ == "__main__":
    sys.exit(main())
