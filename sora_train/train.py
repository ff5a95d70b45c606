"""sora-train: build → one explicit loop → close.

`sora-train [overrides]` composes configs/train.yaml with Hydra, validates it, and then
either trains in this process, or (with launch.nproc_per_node > 1 outside torchrun) starts
that many local processes with torchrun, all sharing one run dir computed here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from .batch_inputs import clean_latents, text_input
from .checkpoint import (
    CheckpointInvalid,
    CheckpointSaveFailed,
    CheckpointStore,
    PendingSave,
    Selection,
    checkpoint_root,
    find_checkpoint,
    save_checkpoint,
    step_of,
)
from .checkpoint.resuming import check_model_fits, read_trainer_state, resumed_accumulation
from .checkpoint.safe_load import UnsafeCheckpoint
from .checkpoint.train_state import Resumed, TrainState
from .checkpoint.universal import convert_to_universal
from .config import (
    ConfigError,
    TrainConfig,
    micro_batch_size,
    register_schema,
    to_train_config,
    validate,
)
from .data.loader import Batch, merge_counts
from .data.recipe import build_loader, tokens_per_sample
from .data.storage import ShardError
from .diffusion.conditioning import draw_frame_mask
from .diffusion.flow import flow_loss
from .diffusion.timesteps import training_timesteps
from .ema import EMA
from .eval.validation import loss_sums, merge_sums, one_pass
from .generate import generate_videos, save_clips
from .guards import TrainingDiverged, TrainingGuards
from .hardware import device_peak_flops
from .metrics import MetricsLogger, final_validation_loss, keys_hash
from .models.denoiser import VideoDenoiser, build_denoiser
from .models.dit import count_parameters
from .models.frozen import frozen_encoders
from .models.prompts import PromptEncoder
from .models.vae import LatentSpace, build_latent_space
from .parallel.checkpointing import apply_activation_checkpointing
from .parallel.compile import apply_block_compile
from .parallel.dist import (
    DistInfo,
    all_gather_objects,
    all_reduce_mean,
    any_rank,
    barrier,
    init_distributed,
    shutdown_distributed,
)
from .parallel.replicas import ReplicasDiverged, check_replicas
from .parallel.sequence import apply_sequence_parallel
from .parallel.zero import build_engine, use_bf16
from .preemption import (
    EXIT_PREEMPTED,
    PreemptionWatch,
    clear_preempted,
    mark_preempted,
    requeue_slurm_job,
    was_preempted,
)
from .pretrained import inference_config
from .recipes import config_dir
from .run_info import write_run_info
from .throughput import (
    StepThroughput,
    banner_lines,
    batch_flops,
    batch_tokens,
    caption_tokens,
    layout_summary,
    peak_memory_bytes,
)

# DeepSpeed's ZeRO-2 path calls a torch collective torch has renamed; the warning is not ours to act on.
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)


def forward_backward(
    engine, batch: Batch, prompts: PromptEncoder, latent_space: LatentSpace | None, generator: torch.Generator,
    cfg: TrainConfig, dtype: torch.dtype,
) -> float:  # fmt: skip
    """One micro-batch: encode (unless `latent_space` is None: the batch holds latents), noise at
    the configured timesteps, flow-matching loss, backward. Returns the loss.

    With frame conditioning configured, a strategy per sample keeps some latent frames clean
    (drawn after the noise); those frames carry no loss. Otherwise nothing more is drawn.
    """
    device = engine.device
    x0 = clean_latents(batch, latent_space, device, dtype)
    text, mask = text_input(batch, prompts, cfg.data.caption_dropout, generator, device, dtype)
    t = training_timesteps(x0.shape[0], video_tokens(x0.shape, cfg), generator, cfg.diffusion)
    noise = torch.randn(x0.shape, generator=generator)
    frame_mask = None  # (B, f) bool: latent frames kept clean
    if cfg.diffusion.conditions_frames():
        frame_mask = draw_frame_mask(x0.shape[0], x0.shape[2], cfg.diffusion, generator).to(device)
    loss = flow_loss(
        lambda x_t, t_: engine(x_t, t_, text, mask, frame_mask), x0, noise.to(device, dtype), t.to(device, dtype),
        frame_mask, cfg.diffusion.loss_weighting,
    )  # fmt: skip
    engine.backward(loss)
    return loss.item()


def video_tokens(shape: torch.Size, cfg: TrainConfig) -> int:
    """Video tokens per sample of a (B, C, F, H, W) batch of what the DiT denoises."""
    return batch_tokens(shape, None, tuple(cfg.model.patch_size)) // shape[0]


def ensure_synthetic_corpus(cfg: TrainConfig) -> None:
    """Write the synthetic corpus when the recipe asks for it and data.train is missing or half-written.

    An existing directory without an interrupted write is left alone, even if empty (the loader
    then refuses it), so a user's own path is never written into.
    """
    from .data_prep.synthetic import MANIFEST_NAME, generate_corpus

    train, root = Path(cfg.data.train), Path(cfg.data.train).parent
    if not (cfg.data.generate_if_missing and cfg.data.name == "synthetic") or (root / MANIFEST_NAME).exists():
        return
    if train.exists() and not any(train.glob("*.partial")):
        return
    print(f"writing the synthetic corpus to {root}", flush=True)
    generate_corpus(root)


def ema_model(
    ema: EMA, cfg: TrainConfig, device: torch.device, dist_info: DistInfo, everywhere: bool = True
) -> VideoDenoiser | None:
    """A plain model holding the EMA weights, for sampling and evaluation.

    Collective when the EMA is sharded (ZeRO-3). With `everywhere` False only the main rank builds
    the model (the others get None), so only the rank that samples holds a whole replica.
    """
    weights = ema.state_dict(only_rank=None if everywhere else 0)
    if not (everywhere or dist_info.is_main):
        return None
    model = build_denoiser(cfg.model)
    model.load_state_dict(weights)
    return model.to(device).eval()


def write_samples(model: VideoDenoiser, cfg: TrainConfig, step: int) -> list[Path]:
    """Sample the configured prompts into RUN_DIR/samples/step_XXXXXXX/NN_prompt.mp4 (none without prompts)."""
    if not cfg.train.sample_prompts:
        return []
    info = inference_config(cfg)
    clips = generate_videos(
        model, cfg.model, cfg.train.sample_prompts, info.clip_shape, cfg.diffusion, seed=cfg.seed
    )
    return save_clips(
        clips, cfg.train.sample_prompts, Path(cfg.run_dir) / "samples" / f"step_{step:07d}", info.fps
    )


def run_synthetic_eval(model: VideoDenoiser, cfg: TrainConfig, dist_info: DistInfo) -> dict:
    """Prompt-following accuracy on held-out prompts, split over the ranks (collective)."""
    from .eval.synthetic_eval import evaluate_prompts, held_out_prompts

    prompts = held_out_prompts(cfg.data.val, cfg.eval.num_prompts)[dist_info.rank :: dist_info.world_size]
    counts = evaluate_prompts(model, inference_config(cfg), prompts, cfg.eval.batch_size, seed=cfg.seed)
    totals = [sum(values) for values in zip(*all_gather_objects(counts), strict=True)]
    color, motion, clips = totals
    return {"color_acc": color / max(1, clips), "motion_acc": motion / max(1, clips), "num_clips": clips}


class RankReport(NamedTuple):
    """What each rank tells rank 0 after a step."""

    keys: list[str]
    tokens: int
    flops: float
    skips: dict[str, int]
    peak_memory: int  # bytes


def data_reports(dist_info: DistInfo, value: object) -> list:
    """`value` from each data-parallel rank, in order (collective): the ranks of a sequence-parallel
    group hold the same samples, so only the first one of each group is counted."""
    gathered = all_gather_objects(value)
    return gathered[:: dist_info.sequence_parallel]


def train(cfg: TrainConfig) -> bool:
    """Train on this process' share of the job (joins or creates the process group).

    Returns False when the run stopped early on a preemption signal (after checkpointing).
    """
    dist_info = init_distributed(cfg.parallel.sequence_parallel)
    try:
        finished = _train(cfg, dist_info)
    except BaseException:
        shutdown_distributed(wait_for_peers=False)
        raise
    shutdown_distributed()
    return finished


def prepare_resume(cfg: TrainConfig, dist_info: DistInfo) -> tuple[Selection, dict | None, Path | None]:
    """Pick the checkpoint (verified by all ranks), adapt gradient accumulation to a new number of
    ranks, and convert the checkpoint for it (on rank 0). Returns the selection, its trainer
    state, and the universal checkpoint to load when the number of ranks changed."""
    selection = find_checkpoint(cfg, dist_info.rank, dist_info.world_size, all_gather_objects)
    if selection.directory is None:
        return selection, None, None
    trainer_state = read_trainer_state(selection.directory)
    cfg.train.grad_accum_steps = resumed_accumulation(trainer_state, cfg, dist_info.data_world)
    if trainer_state["world_size"] == dist_info.world_size:
        return selection, trainer_state, None
    universal = CheckpointStore(checkpoint_root(cfg.run_dir)).universal_dir(trainer_state["step"])
    if dist_info.is_main:
        print(
            f"{selection.directory.name} was saved by {trainer_state['world_size']} ranks; converting it for "
            f"{dist_info.world_size} (grad_accum_steps={cfg.train.grad_accum_steps})",
            flush=True,
        )
        convert_to_universal(selection.directory, universal)
    barrier()
    return selection, trainer_state, universal


def _train(cfg: TrainConfig, dist_info: DistInfo) -> bool:
    run_dirs = set(all_gather_objects(str(Path(cfg.run_dir).resolve())))
    if len(run_dirs) > 1:
        raise ConfigError(
            f"ranks disagree on run_dir ({sorted(run_dirs)}); pass run_dir=... or set SORA_RUN_DIR"
        )
    threads = cfg.train.threads_per_rank or max(1, (os.cpu_count() or 1) // dist_info.local_world_size)
    torch.set_num_threads(threads)
    world, device = dist_info.world_size, dist_info.device
    data_rank, data_world = dist_info.data_rank, dist_info.data_world
    if dist_info.is_main:
        ensure_synthetic_corpus(cfg)  # when started by torchrun directly (launch/torchrun.sh)
    selection, trainer_state, universal = prepare_resume(cfg, dist_info)
    if dist_info.is_main:
        write_run_info(cfg, world)
        clear_preempted(cfg.run_dir)
    barrier()

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_denoiser(cfg.model)
    parameters = count_parameters(model)  # before ZeRO-3 partitions them
    apply_sequence_parallel(model, dist_info.sequence_group)
    if trainer_state is not None:
        check_model_fits(selection.directory, model, trainer_state["config"], cfg)
    apply_activation_checkpointing(
        model, cfg.train.activation_checkpointing, cfg.train.activation_checkpointing_every
    )
    if cfg.train.compile_blocks:  # compiles __call__, so the checkpoint is in the graph (compile.py: order)
        apply_block_compile(model)
    engine = build_engine(model, cfg, world, load_universal=universal is not None)
    dtype = torch.bfloat16 if use_bf16(cfg) else torch.float32
    ema = EMA(engine.module, cfg.train.ema_decay)
    guards = TrainingGuards(
        cfg.guards.max_consecutive_skips, cfg.guards.spike_zscore, cfg.guards.spike_warmup
    )
    # Pretrained encoders run frozen (no gradients, eval mode, outside the optimizer) in the compute dtype.
    latent_space = build_latent_space(cfg.model.latent_space, cfg.model.vae_path, device, dtype)
    precomputed = cfg.data.name == "latents"  # latent shards from `sora-prep encode`: no decoding, no VAE
    validating = cfg.eval.validate and cfg.data.val is not None
    try:
        loader = build_loader(cfg, data_rank, data_world, latent_space, micro_batch_size(cfg, world))
        if validating:  # indexes the held-out split now, so a bad one fails before training
            build_loader(cfg, data_rank, data_world, latent_space, micro_batch_size(cfg, world), split="val")
    except ValueError as error:  # bad shards or data settings: one clear line, not a traceback
        raise ConfigError(str(error)) from error
    # One stream per data-parallel rank: a sequence-parallel group draws the same t, noise and dropout.
    generator = torch.Generator().manual_seed(cfg.seed + 1000 * (data_rank + 1))
    state = TrainState(engine, ema, guards, loader, generator)

    resumed = Resumed()
    if trainer_state is not None:
        resumed = state.restore(selection.directory, trainer_state, universal, cfg, dist_info)
    resumed.passed_over = selection.passed_over
    step = resumed.step
    logger = MetricsLogger(cfg, step, resumed.wandb_id) if dist_info.is_main else None
    if logger:
        report_start(logger, selection.directory, resumed, loader)
        summary = layout_summary(
            cfg, dist_info, parameters, tokens_per_step(cfg, loader, latent_space, data_world)
        )
        print("\n".join(banner_lines(summary)), flush=True)
        logger.log_event("layout", step, summary, echo=False)
    peak_flops = device_peak_flops(device)

    prompts = PromptEncoder(cfg.model, device, dtype)
    if logger and (frozen := frozen_encoders(latent_space, prompts)):
        logger.log_event("frozen_encoders", step, frozen)
    patch = tuple(cfg.model.patch_size)
    batches = iter(loader)
    preemption = PreemptionWatch().install()

    def run_validation(at_step: int) -> None:
        """Validation loss on data.val with the EMA weights (collective); a `validation` event."""
        held_out = build_loader(
            cfg, data_rank, data_world, latent_space, micro_batch_size(cfg, world), split="val"
        )
        averaged = ema_model(ema, cfg, device, dist_info)
        apply_sequence_parallel(averaged, dist_info.sequence_group)
        sums = loss_sums(
            averaged, one_pass(held_out, cfg.eval.val_batches), prompts,
            None if precomputed else latent_space, cfg.eval.val_timesteps, cfg.seed, dtype,
        )  # fmt: skip
        means = merge_sums(data_reports(dist_info, sums))
        if logger:
            logger.log_event(
                "validation", at_step, {"val_loss": means.get("all"), "val_loss_by_bucket": means}
            )

    store = CheckpointStore(checkpoint_root(cfg.run_dir))
    pending: list[PendingSave] = []  # at most one save still committing in the background

    def finish_saving() -> None:
        """Wait for the save in flight (this rank's part; on rank 0 the commit) and log it."""
        while pending:
            directory = pending.pop().wait()
            if logger:
                logger.log_event("checkpoint", step_of(directory), {"path": str(directory)})

    def save(at_step: int, background: bool = False) -> Path:
        finish_saving()
        checksums = check_replicas(engine.module, cfg.parallel.zero_stage, at_step)
        trainer_state, rank_state = state.capture(cfg, world, logger.wandb_id if logger else None)
        rank_state["parameter_checksums"] = checksums  # identical on every rank (ZeRO-1/2), for audits
        pending.append(save_checkpoint(
            engine, cfg.run_dir, dist_info, at_step, rank_state, trainer_state, ema.state_dict(only_rank=0),
            inference_config(cfg), cfg.checkpoint.keep_last, cfg.checkpoint.keep_every, background,
        ))  # fmt: skip
        if not background:
            finish_saving()
        return store.final_dir(at_step)

    def stop_for_preemption(at_step: int, already_saved: bool) -> None:
        """Checkpoint (unless this step just was), leave the marker, ask SLURM to requeue (collective)."""
        signals = all_gather_objects(preemption.signal)  # which ranks were told, for the record
        finish_saving()
        saved = store.final_dir(at_step) if already_saved else save(at_step)
        if logger:
            logger.log_event("preempted", at_step, {"signals_by_rank": signals, "checkpoint": str(saved)})
            mark_preempted(cfg.run_dir, at_step, saved)
            if cfg.checkpoint.requeue:
                logger.log_event("requeue", at_step, {"requested": requeue_slurm_job()})
            logger.close()
        barrier()

    last_saved = step
    while step < cfg.train.max_steps:
        started, data_wait, losses, keys, tokens, flops = time.perf_counter(), 0.0, [], [], 0, 0.0
        for _ in range(cfg.train.grad_accum_steps):
            fetch = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - fetch
            encoder = None if precomputed else latent_space
            losses.append(forward_backward(engine, batch, prompts, encoder, generator, cfg, dtype))
            engine.step()  # DeepSpeed counts micro-batches; the last one of a step updates the weights
            keys.extend(batch["key"])
            micro_tokens = batch_tokens(batch["x"].shape, encoder, patch)
            tokens += micro_tokens
            flops += batch_flops(
                cfg, micro_tokens, len(batch["key"]), caption_tokens(batch, prompts.learned, cfg)
            )
        step += 1
        applied = engine.was_step_applied()  # False: a non-finite gradient norm discarded it on all ranks
        if applied:
            ema.update(engine.module)
        elapsed = time.perf_counter() - started

        loss, wait = all_reduce_mean([sum(losses) / len(losses), data_wait / elapsed], device)
        verdict = guards.observe(applied, loss)
        per_rank = [RankReport(*r) for r in all_gather_objects(
            (keys, tokens, flops, loader.skip_counts(), peak_memory_bytes(device))
        )]  # fmt: skip
        gathered = per_rank[:: dist_info.sequence_parallel]  # one report per data-parallel rank
        if logger:
            all_keys = [k for report in gathered for k in report.keys]
            throughput = StepThroughput(
                tokens=sum(r.tokens for r in gathered), flops=sum(r.flops for r in gathered), seconds=elapsed,
                devices=world, peak_flops=peak_flops,
            )  # fmt: skip
            logger.log({
                "step": step, "loss": loss, "lr": engine.get_lr()[0],
                "grad_norm": float(engine.get_global_grad_norm() or 0.0), "epoch": batch["epoch"],
                "samples_per_s": len(all_keys) / elapsed, "tokens_per_s": throughput.tokens / elapsed,
                **throughput.row(), "data_wait": wait, "peak_memory_gb": max(r.peak_memory for r in per_rank) / 2**30,
                "batch_hash": keys_hash(all_keys), "skipped": sum(merge_counts([r.skips for r in gathered]).values()),
                "skipped_steps": guards.state.skipped_steps, "loss_spikes": guards.state.loss_spikes,
            })  # fmt: skip
            if cfg.train.log_keys:
                logger.log_event("keys", step, {"keys": all_keys})
            if verdict.skipped or verdict.spike:
                kind = "nonfinite_step_skipped" if verdict.skipped else "loss_spike"
                logger.log_event(kind, step, {"loss": loss, **guards.state_dict()})
        if verdict.stop:
            raise TrainingDiverged(guards.diverged_message(step))
        if pending and pending[0].done:
            finish_saving()
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
            save(step, background=cfg.checkpoint.async_commit)
            last_saved = step
        if any_rank(preemption.requested, device):
            stop_for_preemption(step, already_saved=last_saved == step)
            return False
        if (
            validating
            and cfg.eval.val_every
            and step % cfg.eval.val_every == 0
            and step < cfg.train.max_steps
        ):
            run_validation(step)
        if cfg.train.sample_every and step % cfg.train.sample_every == 0 and step < cfg.train.max_steps:
            averaged = ema_model(ema, cfg, device, dist_info, everywhere=False)  # collective under ZeRO-3
            if logger:
                paths = write_samples(averaged, cfg, step)
                logger.log_videos(step, paths, cfg.train.sample_prompts)
            barrier()
    preemption.uninstall()

    finish_saving()
    if cfg.checkpoint.save_final and last_saved != step:
        save(step)
    if validating:
        run_validation(step)
    skipped = merge_counts(data_reports(dist_info, loader.skip_counts()))
    # every rank evaluates a share of the synthetic prompts; otherwise only rank 0 samples
    final_model = ema_model(ema, cfg, device, dist_info, everywhere=cfg.eval.synthetic)
    if logger:
        logger.log_event(
            "data", step, {"skipped_by_reason": skipped, "rejected_by_reason": dict(+loader.rejected)}
        )
        paths = write_samples(final_model, cfg, step)
        logger.log_videos(step, paths, cfg.train.sample_prompts)
        logger.log_event("samples", step, {"paths": [str(p) for p in paths]})
    if cfg.eval.synthetic:
        scores = run_synthetic_eval(final_model, cfg, dist_info)
        if logger:
            logger.log_event("eval_synthetic", step, scores)
    barrier()
    if logger:
        logger.close()
    return True


def tokens_per_step(cfg: TrainConfig, loader, latent_space: LatentSpace, data_world: int) -> dict[str, int]:
    """Tokens one optimizer step trains on, for a step of each bucket: per-rank batch × tokens per sample
    × data-parallel ranks × accumulation."""
    patch = tuple(cfg.model.patch_size)
    settings = loader.settings
    return {
        bucket.name: size
        * tokens_per_sample(bucket, latent_space, patch)
        * data_world
        * cfg.train.grad_accum_steps
        for bucket, size in zip(settings.table.buckets, settings.batch_sizes, strict=True)
    }


def report_start(logger: MetricsLogger, checkpoint: Path | None, resumed: Resumed, loader) -> None:
    """Console lines and metrics events for how this run starts: resumed checkpoint, what was
    passed over, changed settings, and the data index."""
    for problem in resumed.passed_over:
        print(f"checkpoint passed over: {problem}", flush=True)
    if resumed.passed_over:
        logger.log_event("checkpoints_passed_over", resumed.step, {"problems": resumed.passed_over})
    if checkpoint is not None:
        print(f"resumed from {checkpoint} at step {resumed.step}", flush=True)
        for key, old, new in resumed.config_changes:
            print(f"warning: {key} changed since the checkpoint: {old!r} -> {new!r}", flush=True)
        logger.log_event("resumed", resumed.step, {
            "checkpoint": str(checkpoint), "config_changes": {k: [o, n] for k, o, n in resumed.config_changes},
        })  # fmt: skip
    logger.log_event("data_index", resumed.step, {
        "rejected_by_reason": dict(+loader.rejected), "samples_by_bucket": dict(loader.bucket_counts),
        "batch_size_by_bucket": {b.name: size for b, size in zip(
            loader.settings.table.buckets, loader.settings.batch_sizes, strict=True)},
    })  # fmt: skip


def job_config(dict_cfg: DictConfig) -> TrainConfig:
    """This job's TrainConfig; in a multirun sweep each job gets its own run dir unless run_dir was given."""
    hydra_cfg = HydraConfig.get()
    cfg = to_train_config(dict_cfg)
    if hydra_cfg.mode == RunMode.MULTIRUN and not any(
        o.startswith("run_dir=") for o in hydra_cfg.overrides.task
    ):
        cfg.run_dir = hydra_cfg.runtime.output_dir
    cfg.run_dir = str(Path(cfg.run_dir).resolve())
    return cfg


def launch_local(cfg: TrainConfig) -> int:
    """Start launch.nproc_per_node processes with torchrun on this machine; returns their exit code
    (EXIT_PREEMPTED when they stopped on a preemption signal, which torchrun reports as 1)."""
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("run_dir=")]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cfg.launch.nproc_per_node}",
        "-m", "sora_train.train", *overrides, f"run_dir={cfg.run_dir}",
    ]  # fmt: skip
    print(f"run dir {cfg.run_dir}: starting {cfg.launch.nproc_per_node} processes", flush=True)
    started = time.time()
    code = subprocess.run(command, env={**os.environ, "SORA_RUN_DIR": cfg.run_dir}).returncode
    return EXIT_PREEMPTED if code and was_preempted(cfg.run_dir, started) else code


@hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")
def _hydra_main(dict_cfg: DictConfig) -> float | None:
    """Train one job; returns its final validation loss (what a hyperparameter search minimises)."""
    cfg = job_config(dict_cfg)
    try:
        validate(cfg)
        if "LOCAL_RANK" not in os.environ:
            ensure_synthetic_corpus(cfg)  # here, before any rank exists to wait for it
        # Several processes, or one job of a sweep: start them with torchrun, so each job gets
        # fresh processes (DeepSpeed keeps process-wide state that a second run cannot reuse).
        in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
        if "LOCAL_RANK" not in os.environ and (cfg.launch.nproc_per_node > 1 or in_sweep):
            code = launch_local(cfg)
            if code:
                sys.exit(code)
        elif not train(cfg):
            sys.exit(EXIT_PREEMPTED)
    except (ConfigError, ShardError, CheckpointInvalid, UnsafeCheckpoint) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    except (TrainingDiverged, ReplicasDiverged) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(3)
    except CheckpointSaveFailed as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    return final_validation_loss(cfg.run_dir)


def precheck_overrides(overrides: list[str]) -> str | None:
    """Compose the config once with the command-line overrides; a one-line message if that fails."""
    from hydra import compose, initialize_config_dir

    plain = [o for o in overrides if not o.startswith(("-", "hydra.", "hydra/", "+hydra", "~hydra"))]
    try:
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            compose("train", overrides=plain)
    except Exception as error:  # Hydra raises several types; all mean a bad override
        return describe_override_error(error)
    return None


def describe_override_error(error: BaseException) -> str:
    """Hydra's multi-line composition errors as one line that names the problem."""
    text = str(error)
    missing = re.search(r"Could not find '([^/']+)/([^']+)'", text)
    if missing:
        options = re.findall(r"^\t(\S+)$", text.split("Config search path")[0], flags=re.MULTILINE)
        return f"unknown {missing[1]} {missing[2]!r}; choose one of: {', '.join(options)}"
    unknown = re.search(r"Could not override '([^']+)'", text)
    if unknown:
        return f"unknown config key {unknown[1]!r}"
    cause = error.__cause__
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
    if cause is not None and str(cause).strip():
        return f"{first}: {str(cause).strip().splitlines()[0]}"
    return first


def cli() -> None:
    """Entry point of `sora-train`."""
    register_schema()
    args = sys.argv[1:]
    if not any(a in ("-m", "--multirun") or a.startswith("--") for a in args):
        problem = precheck_overrides(args)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    cli()
