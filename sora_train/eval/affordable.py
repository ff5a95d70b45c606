"""Which evaluations of the EMA weights a run can afford, in which layout, and why any is skipped.

A pure function of the config, the model's parameter count and the world size, decided once at
start (`plan_evaluation`) and reported on rank 0 (`report_evaluation`).

Layouts (`sora_train/loop/averaged.py` builds them):

- sharded (ZeRO-3): each rank's EMA partition is swapped into the training engine's partitioned
  model for the evaluation. Every rank takes part in every forward, no rank holds a whole model.
  Validation splits the held-out batches over the data-parallel ranks; samples split the prompts
  over the data-parallel groups, each clip's tokens over its sequence-parallel group.
- replica (below ZeRO-3): a whole EMA model in the compute dtype, built from the fp32 EMA
  assembled in host memory (about 8 bytes per parameter on the building rank while it is built):
  on every rank for validation, on rank 0 alone for samples. `eval.synthetic` always builds one on
  every rank.

Rules (a limit of 0 turns its rule off, which is how a user forces an evaluation):

1. An evaluation that builds a replica is skipped when the replica is larger than
   `eval.max_replica_gib` (default 8 GiB: a 1B model's bf16 replica, 1.9 GiB, or a 3B one's, 5.6 GiB,
   still validates next to a ZeRO-2 run's own weights on an 80 GB GPU; a 7B one, 13 GiB, or a 14B
   one, 26 GiB, is skipped there: on top of the ranks' whole weights and gradients it would not fit,
   and eight ranks of a node would assemble 8 x 8 bytes x P of host memory at once).
2. Samples are skipped when one round of them costs a rank more compute than
   `eval.max_sample_cost_steps` training steps of this run (default 100). A clip costs
   `diffusion.sample_steps` forward passes (twice that with classifier-free guidance), a forward
   a third of the clip's training FLOPs (`flops.sample_flops`); a rank does its share: the clips of
   its data-parallel group, over the group's ranks (sharded), or every clip (replica, rank 0). A
   step is the training FLOPs one rank does per optimizer step, averaged over the buckets. E.g.
   `experiment=minute_720p` on 48 GPUs (SP 6, 8 groups, 2 prompts, 25 steps with guidance) costs 17
   steps sharded; the same clips on rank 0 alone would cost 200 steps, hours while the other ranks
   wait in a collective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..config import TrainConfig
from ..data.buckets import Bucket
from ..flops import sample_flops
from ..metrics import MetricsLogger
from ..planning.memory import video_tokens
from ..planning.plan import bucket_batch_sizes

GIB = 2**30
Layout = Literal["sharded", "replica"]


@dataclass(frozen=True)
class Evaluation:
    """What the run evaluates, and why it skips what it skips."""

    layout: Layout
    validate: bool  # the validation loss (when data.val is set and eval.validate)
    sample: bool  # the sample prompts, every train.sample_every steps and at the end
    synthetic: bool  # eval.synthetic's prompt-following scores
    parameters: int
    replica_bytes: int  # one whole model in the compute dtype
    sample_cost_steps: float  # one round of samples, in training steps of one rank's compute
    skipped: tuple[tuple[str, str], ...]  # (evaluation, why), in the order they run

    def event(self) -> dict:
        """The `evaluation_plan` metrics event's values."""
        return {
            "layout": self.layout, "validate": self.validate, "sample": self.sample, "synthetic": self.synthetic,
            "parameters": self.parameters, "replica_gib": self.replica_bytes / GIB,
            "sample_cost_steps": self.sample_cost_steps, "skipped": dict(self.skipped),
        }  # fmt: skip


def dtype_name(compute_bytes: int) -> str:
    """bf16 or fp32: the compute dtype of `compute_bytes` bytes per element."""
    return "bf16" if compute_bytes == 2 else "fp32"


def replica_reason(what: str, parameters: int, replica: int, compute_bytes: int, limit_gib: float) -> str:
    """Why `what` is skipped: its replica of `replica` bytes exceeds `limit_gib`; names the override."""
    return (
        f"{what} skipped: it builds a whole EMA model of {parameters / 1e9:.2f}B parameters, "
        f"{replica / GIB:.1f} GiB in {dtype_name(compute_bytes)}, above eval.max_replica_gib={limit_gib:g} "
        f"(ZeRO-3 validates and samples sharded, without one); set eval.max_replica_gib=0 (no limit) "
        f"or above {math.ceil(replica / GIB)} to run it"
    )


def sample_cost_reason(cfg: TrainConfig, cost: float, layout: Layout) -> str:
    """Why the samples are skipped: one round costs `cost` training steps, above the limit; names the override."""
    data, limit, clips = cfg.data, cfg.eval.max_sample_cost_steps, len(cfg.train.sample_prompts)
    where = "each on its sequence-parallel group" if layout == "sharded" else "all on rank 0"
    return (
        f"samples skipped: {clips} clip{'s' if clips > 1 else ''} of {data.num_frames}x{data.height}x{data.width} "
        f"({where}) cost a rank {cost:.3g} training steps of compute, above eval.max_sample_cost_steps="
        f"{limit:g}; set eval.max_sample_cost_steps=0 (no limit) or above {math.ceil(cost)} to sample anyway"
    )


def step_flops_per_rank(cfg: TrainConfig, world_size: int) -> float:
    """Training FLOPs one rank does in one optimizer step, averaged over the buckets: a data-parallel
    rank's micro-batch of the bucket, times the accumulation steps, over the sequence-parallel degree."""
    model, table = cfg.model, cfg.data.bucket_table()
    per_token_t = cfg.diffusion.conditions_frames()
    per_bucket = [
        size
        * sample_flops(model, video_tokens(b, model), model.text_max_length, timesteps_per_token=per_token_t)
        for b, size in zip(table.buckets, bucket_batch_sizes(cfg, world_size), strict=True)
    ]
    return sum(per_bucket) / len(per_bucket) * cfg.train.grad_accum_steps / cfg.parallel.sequence_parallel


def sample_cost_steps(cfg: TrainConfig, world_size: int, layout: Layout) -> float:
    """One round of samples (every prompt once, at data.num_frames x height x width) in training
    steps of one rank's compute (module docstring, rule 2); 0 without prompts."""
    prompts = len(cfg.train.sample_prompts)
    if not prompts:
        return 0.0
    model, diffusion, sp = cfg.model, cfg.diffusion, cfg.parallel.sequence_parallel
    clip = Bucket(cfg.data.num_frames, cfg.data.height, cfg.data.width)
    forward = sample_flops(model, video_tokens(clip, model), model.text_max_length) / 3
    passes = diffusion.sample_steps * (2 if diffusion.cfg_scale != 1.0 else 1)
    if layout == "sharded":
        clips, share = math.ceil(prompts / (world_size // sp)), sp
    else:
        clips, share = prompts, 1
    return passes * clips * forward / share / step_flops_per_rank(cfg, world_size)


def plan_evaluation(cfg: TrainConfig, parameters: int, world_size: int, compute_bytes: int) -> Evaluation:
    """What the run evaluates (module docstring: layouts and rules), for a model of `parameters`
    computing in `compute_bytes` per element on `world_size` ranks."""
    layout: Layout = "sharded" if cfg.parallel.zero_stage == 3 else "replica"
    replica, limit = parameters * compute_bytes, cfg.eval.max_replica_gib
    too_big = bool(limit) and replica > limit * GIB
    wanted = {
        "validation": cfg.eval.validate and cfg.data.val is not None,
        "samples": bool(cfg.train.sample_prompts),
        "eval.synthetic": cfg.eval.synthetic,
    }
    needs_replica = {
        "validation": layout == "replica",
        "samples": layout == "replica",
        "eval.synthetic": True,
    }
    skipped = {
        what: replica_reason(what, parameters, replica, compute_bytes, limit)
        for what in wanted
        if wanted[what] and needs_replica[what] and too_big
    }
    cost = sample_cost_steps(cfg, world_size, layout)
    cost_limit = cfg.eval.max_sample_cost_steps
    if wanted["samples"] and "samples" not in skipped and cost_limit and cost > cost_limit:
        skipped["samples"] = sample_cost_reason(cfg, cost, layout)
    runs = {what: wanted[what] and what not in skipped for what in wanted}
    return Evaluation(
        layout=layout, validate=runs["validation"], sample=runs["samples"], synthetic=runs["eval.synthetic"],
        parameters=parameters, replica_bytes=replica, sample_cost_steps=cost, skipped=tuple(skipped.items()),
    )  # fmt: skip


def report_evaluation(logger: MetricsLogger, evaluation: Evaluation, step: int) -> None:
    """Print one line per skipped evaluation (rank 0) and log the `evaluation_plan` event."""
    for _, why in evaluation.skipped:
        print(why, flush=True)
    logger.log_event("evaluation_plan", step, evaluation.event(), echo=False)
