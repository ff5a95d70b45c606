"""A run's plan: memory and FLOPs per GPU per bucket, which buckets fit, and its text and JSON forms."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..config import ConfigError, TrainConfig
from ..data.buckets import batch_sizes_for
from ..flops import (
    FROZEN_TEXT_DIM,
    IMAGE_TOKENS,
    image_tokens,
    parameter_counts,
    sample_flops,
    wan_vae_geometry,
)
from ..hardware import GpuSpec, gpu_spec
from .memory import (
    FRAGMENTATION,
    GIB,
    RESERVE_BYTES,
    StateBytes,
    activation_bytes,
    latent_grid,
    state_bytes,
    tokens_per_rank,
    video_tokens,
)

# The planner's errors against measurements (docs/planner.md: how, when, with which command).
MEASURED_ERRORS = {
    "states": "+0.00% against a DeepSpeed ZeRO-2 engine's parameters, gradients and AdamW states "
    "(1 CPU process, fp32 and bf16; full training 2026-11-22; LoRA adapters of a small Wan 2026-12-05)",
    "activations": "+0.02% at most against saved_tensors_hooks and the storages alive after the forward "
    "(tiny at 2 buckets, S and B at one; every checkpointing policy; cross-attention and MM-DiT with and "
    "without single-stream blocks; fp32 and bf16, CPU kernels; 2026-11-22); Wan blocks, full training and "
    "LoRA on the default targets, per-sample and per-token timesteps: 0.001% at most (2026-12-05)",
    "FLOPs": "within 1.8% of torch's FlopCounterMode (Wan: tiny and 512-wide, text-to-video, per-token "
    "timesteps, image-to-video, LoRA; 2026-12-05)",
    "GPU peak": "not measured yet (needs a GPU: tests/test_planner.py -m gpu, torch.cuda.max_memory_allocated)",
}


@dataclass(frozen=True)
class BucketPlan:
    """One bucket on one GPU."""

    name: str
    latent_grid: tuple[int, int, int]
    video_tokens: int  # S per sample
    text_tokens: int  # T per sample
    batch: int  # samples per GPU per micro-batch (the data-parallel rank's batch)
    tokens_per_gpu: int  # batch · ceil(S / SP)
    activation_bytes: int  # saved for backward
    transient_bytes: int  # gradients in flight (estimate)
    peak_bytes: int  # states + activations + buffers, or the optimizer step's peak if larger
    fits: bool
    sample_flops: float
    step_flops: float  # every GPU, one optimizer step made of this bucket's micro-batches


@dataclass(frozen=True)
class Plan:
    """A run's memory and FLOPs per GPU."""

    preset: str
    parameters: int  # every parameter, LoRA adapters included
    trainable: int  # what the optimizer updates (LoRA: the adapters only)
    lora_rank: int  # 0: full training
    lora_modules: int  # Linear modules with an adapter
    gpu: str
    gpus: int
    data_parallel: int
    sequence_parallel: int
    zero_stage: int
    precision: str
    activation_checkpointing: str  # the policy: none, full, every_k or selective
    activation_checkpointing_every: int  # k of every_k
    gpu_memory_bytes: int
    usable_bytes: int
    states: StateBytes
    buckets: tuple[BucketPlan, ...]
    notes: tuple[str, ...]

    @property
    def fits(self) -> bool:
        return all(bucket.fits for bucket in self.buckets)


def usable_bytes(spec: GpuSpec) -> int:
    """What the caching allocator can hand out on `spec`: total less the reserve and fragmentation."""
    return int((spec.memory_bytes - RESERVE_BYTES) * (1 - FRAGMENTATION))


def planned_precision(cfg: TrainConfig) -> str:
    """bf16 or fp32 on a GPU: `auto` means bf16 (every GPU in the table supports it)."""
    return "fp32" if cfg.train.precision == "fp32" else "bf16"


def _check_layout(cfg: TrainConfig, gpus: int) -> None:
    """The run's DP × SP grid exists on `gpus` GPUs (raises ConfigError)."""
    sp, heads = cfg.parallel.sequence_parallel, cfg.model.num_heads
    if gpus < 1:
        raise ConfigError(f"--gpus must be at least 1, got {gpus}")
    if sp < 1 or gpus % sp:
        raise ConfigError(f"parallel.sequence_parallel={sp} must divide the number of GPUs ({gpus})")
    if heads % sp:
        raise ConfigError(f"parallel.sequence_parallel={sp} must divide model.num_heads={heads}")


def bucket_batch_sizes(cfg: TrainConfig, gpus: int) -> tuple[int, ...]:
    """Per-GPU batch of each bucket, as the loader sizes it: the bucket's own, else
    data.tokens_per_batch // S, else the micro batch (global batch / (DP · accumulation))."""
    table = cfg.data.bucket_table()
    ranks = (gpus // cfg.parallel.sequence_parallel) * cfg.train.grad_accum_steps
    global_batch = cfg.train.global_batch_size
    micro = global_batch // ranks if global_batch >= ranks and global_batch % ranks == 0 else 0
    sized_by_micro = cfg.data.tokens_per_batch == 0 and any(b.batch_size is None for b in table.buckets)
    if sized_by_micro and not micro:
        raise ConfigError(
            f"train.global_batch_size={global_batch} does not divide across {gpus // cfg.parallel.sequence_parallel} "
            f"data-parallel ranks × {cfg.train.grad_accum_steps} accumulation steps"
        )
    try:
        return batch_sizes_for(table, cfg.data.tokens_per_batch, lambda b: video_tokens(b, cfg.model), micro)
    except ValueError as error:
        raise ConfigError(str(error)) from error


def plan_run(cfg: TrainConfig, gpus: int, gpu: str) -> Plan:
    """The plan of `cfg` on `gpus` GPUs of type `gpu` (raises ConfigError or ValueError on bad input)."""
    _check_layout(cfg, gpus)
    spec, model, parallel = gpu_spec(gpu), cfg.model, cfg.parallel
    precision = planned_precision(cfg)
    e = 2 if precision == "bf16" else 4
    counts = parameter_counts(model)
    states = state_bytes(counts, parallel, gpus, bf16=e == 2)
    usable = usable_bytes(spec)
    sp, dp = parallel.sequence_parallel, gpus // parallel.sequence_parallel
    policy, every = cfg.train.activation_checkpointing, cfg.train.activation_checkpointing_every
    per_token = cfg.diffusion.conditions_frames()  # a frame mask: Wan embeds a timestep per token
    buckets = []
    for bucket, batch in zip(cfg.data.bucket_table().buckets, bucket_batch_sizes(cfg, gpus), strict=True):
        tokens = video_tokens(bucket, model)
        act = activation_bytes(
            model, batch, tokens, dtype_bytes=e, policy=policy, every=every, sequence_parallel=sp,
            timesteps_per_token=per_token,
        )  # fmt: skip
        peak = states.persistent + max(
            act.saved + act.transient + states.reduce_buffers, states.step_transient
        )
        flops = sample_flops(model, tokens, model.text_max_length, timesteps_per_token=per_token)
        buckets.append(BucketPlan(
            name=bucket.name, latent_grid=latent_grid(bucket, model), video_tokens=tokens,
            text_tokens=model.text_max_length, batch=batch, tokens_per_gpu=batch * tokens_per_rank(tokens, sp),
            activation_bytes=act.saved, transient_bytes=act.transient, peak_bytes=peak, fits=peak <= usable,
            sample_flops=flops, step_flops=flops * batch * dp * cfg.train.grad_accum_steps,
        ))  # fmt: skip
    return Plan(
        preset=model.preset, parameters=counts.total, trainable=counts.trainable,
        lora_rank=model.lora.rank, lora_modules=counts.adapted_modules,
        gpu=spec.name, gpus=gpus,
        data_parallel=dp, sequence_parallel=sp, zero_stage=parallel.zero_stage, precision=precision,
        activation_checkpointing=policy, activation_checkpointing_every=every,
        gpu_memory_bytes=spec.memory_bytes, usable_bytes=usable,
        states=states, buckets=tuple(buckets), notes=plan_notes(cfg),
    )  # fmt: skip


def plan_notes(cfg: TrainConfig) -> tuple[str, ...]:
    """The assumptions a plan of `cfg` rests on, beyond the model in this module's docstring."""
    model, notes = cfg.model, []
    if model.latent_space == "wan" and wan_vae_geometry(model.vae_path) is None:
        notes.append("Wan latents taken as Wan 2.1's VAE: 16 channels, 4x time and 8x8 space compression")
    path = model.text_encoder_path
    files = path and (Path(path) / "config.json").is_file()
    if model.text_encoder != "learned" and model.variant != "wan" and not files:
        notes.append(f"frozen text encoder width taken as {FROZEN_TEXT_DIM} (T5-XXL / UMT5-XXL's d_model)")
    if image_tokens(model) and model.pos_embed_seq_len is None:
        notes.append(f"image tokens taken as {IMAGE_TOKENS} (CLIP ViT-H/14 at 224x224)")
    if model.lora.enabled:
        notes.append(
            "LoRA: gradients, optimizer states and EMA for the adapters only; frozen weights in the training "
            "dtype; FLOPs count the work done (frozen weights: no weight gradient)"
        )
    if cfg.diffusion.conditions_frames() and model.variant == "wan":
        notes.append("frame conditioning: one timestep per video token (time MLP and modulation per token)")
    if not cfg.data.precomputed and (model.latent_space == "wan" or model.text_encoder != "learned"):
        notes.append(
            "not counted: the frozen VAE / text encoder that encode each batch on the GPU; "
            "precompute them with `sora-prep encode` and train with data=latents"
        )
    if cfg.parallel.sequence_parallel > 1:
        notes.append("sequence parallel: text tokens and per-sample tensors are whole on every rank")
    return tuple(notes)


def required_sequence_parallel(cfg: TrainConfig, gpus: int, gpu: str) -> int | None:
    """The smallest sequence-parallel degree (dividing model.num_heads and `gpus`) at which every
    bucket fits, all else unchanged; None when none does."""
    for degree in range(1, cfg.model.num_heads + 1):
        if cfg.model.num_heads % degree or gpus % degree:
            continue
        trial = replace(cfg, parallel=replace(cfg.parallel, sequence_parallel=degree))
        try:
            if plan_run(trial, gpus, gpu).fits:
                return degree
        except ConfigError:
            continue
    return None


# Checkpointing policies in the order of the compute they repeat in backward: selective recomputes
# pointwise ops only, every_k every k-th block's forward, full every block's.
SUGGESTED_POLICIES = ("selective", "every_k", "full")


def fitting_policies(cfg: TrainConfig, gpus: int, gpu: str) -> tuple[str, ...]:
    """The activation checkpointing policies, other than the run's, at which every bucket fits,
    all else unchanged (in `SUGGESTED_POLICIES` order)."""
    return tuple(
        policy
        for policy in SUGGESTED_POLICIES
        if policy != cfg.train.activation_checkpointing
        and plan_run(replace(cfg, train=replace(cfg.train, activation_checkpointing=policy)), gpus, gpu).fits
    )


def describe_policy(policy: str, every: int) -> str:
    """An activation checkpointing policy as the plan prints it, e.g. `every_k (k=2)`."""
    return f"{policy} (k={every})" if policy == "every_k" else policy


# ---------------------------------------------------------------------------------------------
# Output


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def _count(n: int) -> str:
    """A parameter count: 174.1M, 14.29B."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _model_line(plan: Plan) -> str:
    """The plan's first line: the preset, its parameters and what trains."""
    lora = f": LoRA rank {plan.lora_rank} on {plan.lora_modules} Linear modules" if plan.lora_rank else ""
    return f"model {plan.preset}: {_count(plan.parameters)} parameters ({_count(plan.trainable)} trainable{lora})"


def format_plan(plan: Plan, suggestion: int | None = None, policies: tuple[str, ...] = ()) -> str:
    """The plan as console text; `suggestion`: the sequence-parallel degree at which all buckets fit;
    `policies`: the activation checkpointing policies at which they do (`fitting_policies`)."""
    s = plan.states
    lines = [
        _model_line(plan),
        f"{plan.gpus} x {plan.gpu} ({_gib(plan.gpu_memory_bytes)} GiB): data parallel {plan.data_parallel} x "
        f"sequence parallel {plan.sequence_parallel}, ZeRO-{plan.zero_stage}, {plan.precision}, "
        f"activation checkpointing {describe_policy(plan.activation_checkpointing, plan.activation_checkpointing_every)}",
        "",
        f"{'per GPU':<40}{'GiB':>8}",
    ]
    rows = [
        (f"parameters ({plan.precision})", s.parameters),
        (f"gradients ({plan.precision})", s.gradients),
        ("optimizer (fp32 master + 2 moments)", s.optimizer),
        ("EMA (fp32 master, sharded)", s.ema),
        ("reduce buckets (during backward)", s.reduce_buffers),
        ("fp32 gradients (at the optimizer step)", s.step_transient),
        ("host memory per rank (offloaded)", s.host),
    ]
    lines += [f"  {label:<38}{_gib(value):>8}" for label, value in rows]
    lines += [
        f"  usable: {_gib(plan.usable_bytes)} of {_gib(plan.gpu_memory_bytes)} GiB ({_gib(RESERVE_BYTES)} GiB "
        f"reserve for the CUDA context, {FRAGMENTATION:.0%} of the rest for fragmentation)",
        "",
        f"{'bucket':<13}{'latent':>11}{'tokens':>8}{'batch':>6}{'tok/GPU':>9}{'saved GiB':>10}{'peak GiB':>9}"
        f"{'PFLOP/step':>11}  fits",
    ]
    for b in plan.buckets:
        latent = "x".join(str(n) for n in b.latent_grid)
        lines.append(
            f"{b.name:<13}{latent:>11}{b.video_tokens:>8}{b.batch:>6}{b.tokens_per_gpu:>9}"
            f"{_gib(b.activation_bytes):>10}{_gib(b.peak_bytes):>9}{b.step_flops / 1e15:>11.3f}  "
            f"{'yes' if b.fits else 'NO'}"
        )
    failing = [b.name for b in plan.buckets if not b.fits]
    lines.append("")
    if failing:
        lines.append(f"DOES NOT FIT: {len(failing)} of {len(plan.buckets)} buckets ({', '.join(failing)})")
        if suggestion is not None:
            lines.append(f"every bucket fits with parallel.sequence_parallel={suggestion}")
        if policies:
            either = policies[-1] if len(policies) == 1 else f"{', '.join(policies[:-1])} or {policies[-1]}"
            lines.append(f"every bucket fits with train.activation_checkpointing={either}")
        if suggestion is None and not policies:
            lines.append(
                "neither a sequence-parallel degree nor train.activation_checkpointing=selective, every_k or "
                "full makes every bucket fit; lower the batch (data.tokens_per_batch, train.grad_accum_steps) "
                "or raise the ZeRO stage"
            )
    else:
        lines.append(f"every bucket fits ({len(plan.buckets)} of {len(plan.buckets)})")
    lines += [f"note: {note}" for note in plan.notes]
    lines.append("planner error against measurements (docs/planner.md):")
    lines += [f"  {name}: {error}" for name, error in MEASURED_ERRORS.items()]
    return "\n".join(lines)


def plan_json(plan: Plan, suggestion: int | None = None, policies: tuple[str, ...] = ()) -> str:
    """The plan as JSON (bytes and FLOPs as numbers)."""
    data = asdict(plan)
    data.update(
        fits=plan.fits, required_sequence_parallel=suggestion, fitting_checkpointing=list(policies),
        measured_errors=MEASURED_ERRORS,
    )  # fmt: skip
    return json.dumps(data, indent=2)
