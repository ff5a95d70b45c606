"""train(cfg): build the pieces, then one short loop.

The loop reads top to bottom: step → train_step → log → checkpoint when due → stop on a preemption
signal → validate when due → sample when due. Each component (`sora_train.loop`) decides its own
timing; this module only builds them, in an order that keeps every random stream where a resumed
or restarted run expects it. The command line (`sora-train`) lives in `sora_train.cli`.
"""

from __future__ import annotations

import gc
import os
import warnings
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import CheckpointStore, Selection, checkpoint_root, find_checkpoint
from .checkpoint.resuming import check_model_fits, read_trainer_state, resumed_accumulation
from .checkpoint.train_state import Resumed, TrainState
from .checkpoint.universal import conversion_seconds, conversion_workers, convert_to_universal
from .config import ConfigError, TrainConfig
from .data.loader import Batch, VideoLoader
from .data.recipe import build_loader
from .data.synthetic import CORPUS_WRITE_SECONDS, ensure_corpus
from .ema import EMA
from .eval.affordable import plan_evaluation, report_evaluation
from .guards import TrainingDiverged, TrainingGuards
from .loop.averaged import AveragedWeights
from .loop.checkpointer import Checkpointer
from .loop.engine import BatchLayout, batch_layout, engine_config, training_engine
from .loop.reporting import StepReporter, report_start, tokens_per_step
from .loop.sampler import Sampler
from .loop.step import Stepper
from .loop.validator import Validator
from .metrics import MetricsLogger
from .models.denoiser import VideoDenoiser, build_denoiser
from .models.frozen import frozen_encoders
from .models.lora import LoraTargetError, apply_lora, lora_spec
from .models.prompts import PromptEncoder
from .models.vae import LatentSpace, build_latent_space
from .parallel.attention_backend import apply_attention_backend
from .parallel.checkpointing import apply_activation_checkpointing
from .parallel.compile import apply_block_compile
from .parallel.dist import (
    DistInfo,
    all_gather_objects,
    barrier,
    init_distributed,
    shutdown_distributed,
    wait_for_main,
)
from .parallel.sequence import apply_sequence_parallel
from .parallel.zero import copy_from_rank0, full_numel, partitioned_construction, use_bf16
from .preemption import PreemptionWatch, clear_preempted, signal_name
from .pretrained import load_pretrained
from .report import report_run
from .run_info import write_run_info
from .throughput import layout_summary

# DeepSpeed's ZeRO-2 path calls a torch collective torch has renamed; the warning is not ours to act on.
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)


@dataclass
class ResumePoint:
    """Where a run starts: the checkpoint (none for a fresh run), its trainer state, the universal
    checkpoint to load when the number of ranks changed, and the batch layout the run keeps."""

    selection: Selection
    trainer_state: dict | None
    universal: Path | None
    layout: BatchLayout


@dataclass
class Run:
    """A built run: the batches, the step and its reporter, and the components that keep time."""

    cfg: TrainConfig
    start_step: int
    batches: Iterator[Batch]  # this rank's batches
    stepper: Stepper
    reporter: StepReporter
    checkpointer: Checkpointer
    validator: Validator
    sampler: Sampler
    logger: MetricsLogger | None  # rank 0 only


def train(cfg: TrainConfig) -> bool:
    """Train on this process' share of the job (joins or creates the process group).

    Returns False when the run stopped early on a preemption signal (after checkpointing).
    """
    watch = PreemptionWatch().install()  # before any long start-up work: a signal then only sets a flag
    dist_info = init_distributed(cfg.parallel.sequence_parallel, cfg.parallel.collective_timeout_s)
    try:
        run = build_run(cfg, dist_info, watch)
        with closing(run.reporter):  # ends rank 0's live progress line however the loop stops
            finished = run_loop(run)
    except BaseException:
        shutdown_distributed(wait_for_peers=False)
        raise
    finally:
        watch.uninstall()
    if finished and watch.requested:  # the final save, validation or samples ran on
        print(
            f"rank {dist_info.rank}: {signal_name(watch.signal)} came after the last step: the run finished",
            flush=True,
        )
    # Free the engine and everything that refers to the process groups (ZeRO-3 parameters keep
    # theirs) while the interpreter is whole: a gloo group destroyed only at interpreter exit can
    # abort the process ("terminate called without an active exception") after a finished run.
    run.stepper.engine.destroy()
    del run
    gc.collect()
    shutdown_distributed()
    if finished and dist_info.is_main:
        report_run(cfg.run_dir)  # RUN_DIR/report.html; a failure is a warning, never the run's
    return finished


def run_loop(run: Run) -> bool:
    """Train from the run's start step to `train.max_steps`, then finish: last checkpoint,
    validation, data totals, samples and evaluation. False when stopped by a preemption signal."""
    step, max_steps = run.start_step, run.cfg.train.max_steps
    if run.checkpointer.preempted(step):  # signalled during start-up: nothing new to save
        return False
    while step < max_steps:
        step += 1
        outcome = run.stepper.train_step(run.batches, step)
        run.reporter.log_step(step, outcome)
        if outcome.verdict.stop:
            raise TrainingDiverged(run.stepper.guards.diverged_message(step))
        run.checkpointer.maybe_save(step)
        if run.checkpointer.preempted(step):
            return False
        run.validator.maybe_run(step)
        run.sampler.maybe_sample(step)
    run.checkpointer.finish(step)
    run.validator.run(step)
    run.reporter.log_data_totals(step)
    run.sampler.finish(step)
    barrier()
    if run.logger:
        run.logger.close()
    return True


def build_run(cfg: TrainConfig, dist_info: DistInfo, watch: PreemptionWatch | None = None) -> Run:
    """Everything the loop needs, built in a fixed order (collective): the corpus and the resume
    point, the model in its engine, the loader, the restored state, then the loop's components.
    `watch`: the preemption watch installed before start-up (the checkpointer installs one if None)."""
    start_run(cfg, dist_info)
    resume = prepare_resume(cfg, dist_info)
    if dist_info.is_main:
        write_run_info(cfg, dist_info.world_size)
        clear_preempted(cfg.run_dir)
    barrier()
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model, parameters = build_model(cfg, dist_info, resume)
    engine = training_engine(model, cfg, resume.layout, load_universal=resume.universal is not None)
    dtype = torch.bfloat16 if use_bf16(cfg.train.precision) else torch.float32
    ema = EMA(engine.module, cfg.train.ema_decay)
    guards = TrainingGuards(
        cfg.guards.max_consecutive_skips, cfg.guards.spike_zscore, cfg.guards.spike_warmup
    )
    # Pretrained encoders run frozen (no gradients, eval mode, outside the optimizer) in the compute dtype.
    latent_space = build_latent_space(cfg.model.latent_space, cfg.model.vae_path, dist_info.device, dtype)
    loader = build_loaders(cfg, dist_info, latent_space, resume.layout.micro_batch)
    state = TrainState(engine, ema, guards, loader)
    resumed = restore(state, resume, cfg, dist_info)
    logger = start_logging(cfg, dist_info, resume, resumed, loader, latent_space, parameters)
    evaluation = plan_evaluation(cfg, parameters, dist_info.world_size, dtype.itemsize)
    if logger:
        report_evaluation(logger, evaluation, resumed.step)
    averaged = AveragedWeights(ema, engine, cfg, dist_info, dtype)  # sharded under ZeRO-3, else a replica
    prompts = PromptEncoder(cfg.model, dist_info.device, dtype)
    if logger and (frozen := frozen_encoders(latent_space, prompts)):
        logger.log_event("frozen_encoders", resumed.step, frozen)
    encoder = None if cfg.data.precomputed else latent_space
    stepper = Stepper(
        engine,
        ema,
        guards,
        prompts,
        encoder,
        cfg,
        dtype,
        resume.layout.accumulation,
        dist_info.sequence_group,
    )
    batches = iter(loader)
    return Run(
        cfg=cfg, start_step=resumed.step, batches=batches, stepper=stepper, logger=logger,
        reporter=StepReporter(logger, dist_info, engine, loader, guards, cfg.train.log_keys),
        checkpointer=Checkpointer(cfg, dist_info, state, resume.layout.accumulation, logger, resumed.step, watch),
        validator=Validator(
            cfg, dist_info, averaged, prompts, latent_space, resume.layout.micro_batch, logger, evaluation.validate
        ),
        sampler=Sampler(cfg, dist_info, averaged, logger, evaluation),
    )  # fmt: skip


def start_run(cfg: TrainConfig, dist_info: DistInfo) -> None:
    """Check that all ranks share one run dir, size this process' CPU threads, and write the
    synthetic corpus on rank 0 when the recipe asks for it (the others wait for it)."""
    run_dirs = set(all_gather_objects(str(Path(cfg.run_dir).resolve())))
    if len(run_dirs) > 1:
        raise ConfigError(
            f"ranks disagree on run_dir ({sorted(run_dirs)}); pass run_dir=... or set SORA_RUN_DIR"
        )
    threads = cfg.train.threads_per_rank or max(1, (os.cpu_count() or 1) // dist_info.local_world_size)
    torch.set_num_threads(threads)
    if cfg.data.generate_if_missing and cfg.data.name == "synthetic":
        if dist_info.is_main:
            ensure_corpus(cfg.data.train)
        wait_for_main("write the synthetic corpus", CORPUS_WRITE_SECONDS)


def prepare_resume(cfg: TrainConfig, dist_info: DistInfo) -> ResumePoint:
    """Pick the checkpoint (verified by all ranks), derive the gradient accumulation that keeps its
    micro batch on a new number of ranks, and convert it for them (on rank 0)."""
    selection = find_checkpoint(cfg, dist_info.rank, dist_info.world_size, all_gather_objects)
    selection.set_aside = leave_abandoned_branch(cfg, selection, dist_info)
    if selection.directory is None:
        return ResumePoint(selection, None, None, batch_layout(cfg, dist_info.data_world))
    trainer_state = read_trainer_state(selection.directory)
    accumulation = resumed_accumulation(trainer_state, cfg, dist_info.data_world)
    layout = batch_layout(cfg, dist_info.data_world, accumulation)
    if trainer_state["world_size"] == dist_info.world_size:
        return ResumePoint(selection, trainer_state, None, layout)
    universal = CheckpointStore(checkpoint_root(cfg.run_dir)).universal_dir(trainer_state["step"])
    if dist_info.is_main:
        print(
            f"{selection.directory.name} was saved by {trainer_state['world_size']} ranks; converting it for "
            f"{dist_info.world_size} (grad_accum_steps={accumulation})",
            flush=True,
        )
        convert_to_universal(selection.directory, universal, conversion_workers())
    wait_for_main(
        f"convert {selection.directory.name} to a universal checkpoint",
        conversion_seconds(selection.directory),
    )
    return ResumePoint(selection, trainer_state, universal, layout)


def leave_abandoned_branch(cfg: TrainConfig, selection: Selection, dist_info: DistInfo) -> list[str]:
    """Rank 0 takes this run's checkpoints newer than the one it resumes from (all of them when it
    starts over) out of the run (`checkpoint.abandoned`), so pruning and `resume=auto` follow the
    branch the run continues. Returns their names (the same on every rank)."""
    names: list[str] = []
    if dist_info.is_main:
        step = read_trainer_state(selection.directory)["step"] if selection.directory is not None else 0
        store = CheckpointStore(checkpoint_root(cfg.run_dir))
        names = store.set_aside_newer(step, delete=cfg.checkpoint.abandoned == "delete")
    return all_gather_objects(names)[0]


def build_model(cfg: TrainConfig, dist_info: DistInfo, resume: ResumePoint) -> tuple[VideoDenoiser, int]:
    """The denoiser, with released weights from `model.init_from` and LoRA adapters when configured,
    then sequence parallelism, the attention kernels, activation checkpointing and compile applied,
    checked against the checkpoint it resumes from; and its parameter count.

    Under ZeRO-3 a model with `init_from` is built partitioned and its weights are streamed in one
    tensor at a time from rank 0, so no rank ever holds the whole model.
    """
    partitioned = cfg.parallel.zero_stage == 3 and cfg.model.init_from is not None
    with partitioned_construction(engine_config(cfg, resume.layout), enabled=partitioned):
        model = build_denoiser(cfg.model)
    parameters = sum(full_numel(p) for p in model.parameters())
    if cfg.model.init_from and (resume.trainer_state is None or cfg.model.lora.enabled):
        # a resumed full fine-tune takes every weight from its checkpoint; LoRA's base is not in it
        load_pretrained(model, cfg.model.init_from, copy=copy_from_rank0 if partitioned else None)
    if cfg.model.lora.enabled:
        add_lora(model, cfg)
    apply_sequence_parallel(model, dist_info.sequence_group)
    try:  # before compile
        apply_attention_backend(model, cfg.train.attention_backend, dist_info.device)
    except ValueError as error:  # a kernel this device does not have
        raise ConfigError(str(error)) from error
    if resume.trainer_state is not None:
        check_model_fits(resume.selection.directory, model, resume.trainer_state["config"], cfg)
    apply_activation_checkpointing(
        model, cfg.train.activation_checkpointing, cfg.train.activation_checkpointing_every
    )
    if cfg.train.compile_blocks:  # compiles __call__, so the checkpoint is in the graph (compile.py: order)
        apply_block_compile(model)
    return model, parameters


def add_lora(model: VideoDenoiser, cfg: TrainConfig) -> None:
    """`model.lora`'s adapters on `model`, everything else frozen (targets that match nothing are a
    ConfigError)."""
    lora = cfg.model.lora
    try:
        apply_lora(model, lora_spec(cfg.model.variant, lora.rank, lora.alpha, lora.dropout, lora.targets))
    except LoraTargetError as error:
        raise ConfigError(str(error)) from error


def build_loaders(
    cfg: TrainConfig, dist_info: DistInfo, latent_space: LatentSpace, micro_batch: int
) -> VideoLoader:
    """This data-parallel rank's training loader. The held-out split is indexed now too, so a bad
    one fails before training; bad shards or data settings become one clear line."""
    rank, world = dist_info.data_rank, dist_info.data_world
    try:
        loader = build_loader(cfg, rank, world, latent_space, micro_batch)
        if cfg.eval.validate and cfg.data.val is not None:
            build_loader(cfg, rank, world, latent_space, micro_batch, split="val")
    except ValueError as error:
        raise ConfigError(str(error)) from error
    check_same_data(loader)
    return loader


def check_same_data(loader: VideoLoader) -> None:
    """Every rank planned from the same index (collective): the same shards, samples, byte ranges and
    buckets. A rank that read a shard differently (changed while the ranks scanned it, or a stale
    cache) would otherwise train on other samples than its plan says (raises ConfigError)."""
    seen = all_gather_objects((loader.plan_id, loader.index_digest))
    differing = [rank for rank, described in enumerate(seen) if described != seen[0]]
    if differing:
        raise ConfigError(
            f"the ranks indexed the corpus differently (rank 0: plan {seen[0][0]}, index {seen[0][1]}; "
            f"ranks {differing} differ): a shard changed or was read differently while they scanned it"
        )


def restore(state: TrainState, resume: ResumePoint, cfg: TrainConfig, dist_info: DistInfo) -> Resumed:
    """Load the checkpoint into the live state (collective), or start at step 0."""
    resumed = Resumed()
    if resume.trainer_state is not None:
        resumed = state.restore(
            resume.selection.directory, resume.trainer_state, resume.universal, cfg, dist_info
        )
    resumed.passed_over = resume.selection.passed_over
    resumed.set_aside = resume.selection.set_aside
    return resumed


def start_logging(
    cfg: TrainConfig, dist_info: DistInfo, resume: ResumePoint, resumed: Resumed, loader: VideoLoader,
    latent_space: LatentSpace, parameters: int,
) -> MetricsLogger | None:  # fmt: skip
    """Rank 0's metrics logger, after reporting how the run starts and printing the banner (None elsewhere)."""
    if not dist_info.is_main:
        return None
    logger = MetricsLogger(cfg, resumed.step, resumed.wandb_id)
    layout = resume.layout
    tokens = tokens_per_step(cfg, loader, latent_space, layout.data_world, layout.accumulation)
    report_start(
        logger,
        resume.selection.directory,
        resumed,
        loader,
        layout_summary(cfg, dist_info, parameters, tokens),
    )
    return logger
