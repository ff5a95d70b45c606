"""Samples from the EMA weights during training (every `train.sample_every` steps) and at the end,
then the synthetic task's prompt-following evaluation when `eval.synthetic`.

Under ZeRO-3 the samples run in the sharded layout (`averaged.py`): the prompts are split over the
data-parallel groups, each clip's tokens over its group's ranks, and every rank runs the same
forwards (a group with fewer prompts samples a copy of the first prompt and keeps nothing).
Below ZeRO-3 rank 0 samples every prompt with a replica while the others wait. Prompt i's noise
comes from `seed + i`, so its clip does not depend on the layout. Either can be skipped when the
run cannot afford it (`sora_train/eval/affordable.py`)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
from torch import nn

from ..config import TrainConfig
from ..eval.affordable import Evaluation
from ..eval.synthetic_eval import (
    RESULTS_DIR,
    ClipResult,
    count_correct,
    evaluate_clips,
    held_out_prompts,
    save_clip_results,
)
from ..generate import generate_videos, prompt_slug
from ..metrics import MetricsLogger
from ..parallel.dist import DistInfo, all_gather_objects, wait_for_main
from ..pretrained import inference_config
from ..throughput import peak_memory_bytes
from ..video_io import write_mp4
from .averaged import AveragedWeights

SAMPLE_WAIT_S = 600.0  # the least the other ranks wait for rank 0's samples (replica layout)


def sample_clip(model: nn.Module, cfg: TrainConfig, index: int) -> np.ndarray:
    """(F, H, W, 3) uint8: the clip of sample prompt `index`, its noise seeded by `seed + index`."""
    shape = inference_config(cfg).clip_shape
    prompt = cfg.train.sample_prompts[index]
    return generate_videos(model, cfg.model, [prompt], shape, cfg.diffusion, seed=cfg.seed + index)[0]


def write_sample(model: nn.Module, cfg: TrainConfig, step: int, index: int) -> Path:
    """Sample prompt `index` into RUN_DIR/samples/step_XXXXXXX/NN_prompt.mp4."""
    prompt = cfg.train.sample_prompts[index]
    path = Path(cfg.run_dir) / "samples" / f"step_{step:07d}" / f"{index:02d}_{prompt_slug(prompt)}.mp4"
    return write_mp4(path, sample_clip(model, cfg, index), inference_config(cfg).fps)


def write_samples(model: nn.Module, cfg: TrainConfig, step: int) -> list[Path]:
    """Sample every configured prompt (`write_sample`); none without prompts."""
    return [write_sample(model, cfg, step, index) for index in range(len(cfg.train.sample_prompts))]


def sharded_samples(model: nn.Module, cfg: TrainConfig, info: DistInfo, step: int) -> list[Path]:
    """Every data-parallel group samples prompts group, group + groups, ... with the sharded `model`,
    then a copy of prompt 0 for each round it has no prompt left, so all ranks run the same forwards;
    the group's first rank writes the files (collective). Every path, in prompt order."""
    prompts, groups = cfg.train.sample_prompts, info.data_world
    writes = info.rank == info.data_rank * info.sequence_parallel
    written = []
    for round_ in range(math.ceil(len(prompts) / groups)):
        index = info.data_rank + round_ * groups
        if index >= len(prompts):
            sample_clip(model, cfg, 0)  # keeps this group in step; nothing is kept
        elif writes:
            written.append((index, write_sample(model, cfg, step, index)))
        else:
            sample_clip(model, cfg, index)
    return [path for _, path in sorted(pair for pairs in all_gather_objects(written) for pair in pairs)]


def synthetic_scores(
    model: nn.Module, cfg: TrainConfig, dist_info: DistInfo
) -> tuple[dict, list[ClipResult]]:
    """Prompt-following accuracy on held-out prompts, split over the ranks (collective), and every
    clip's result in prompt order (the clips are gathered from all ranks: small synthetic clips)."""
    world = dist_info.world_size
    prompts = held_out_prompts(cfg.data.val, cfg.eval.num_prompts)
    mine = range(dist_info.rank, len(prompts), world)  # prompt i's noise: seed + i, on any layout
    local = evaluate_clips(
        model,
        inference_config(cfg),
        [prompts[i] for i in mine],
        cfg.eval.batch_size,
        [cfg.seed + i for i in mine],
    )
    per_rank = all_gather_objects(local)  # rank r holds prompts r, r + world, ...
    results = [per_rank[i % world][i // world] for i in range(sum(map(len, per_rank)))]
    color, motion, clips = count_correct(results)
    scores = {"color_acc": color / max(1, clips), "motion_acc": motion / max(1, clips), "num_clips": clips}
    return scores, results


class Sampler:
    """Samples the configured prompts in the run's layout; at the end every rank evaluates a share
    of the synthetic prompts when asked to, and the ranks' peak memory is logged (all methods
    collective). `evaluation` says what the run affords (default: everything asked for)."""

    def __init__(
        self, cfg: TrainConfig, dist_info: DistInfo, averaged: AveragedWeights, logger: MetricsLogger | None,
        evaluation: Evaluation | None = None,
    ):  # fmt: skip
        self.cfg, self.dist_info, self.averaged, self.logger = cfg, dist_info, averaged, logger
        self.sample_allowed = evaluation.sample if evaluation else bool(cfg.train.sample_prompts)
        self.synthetic_allowed = evaluation.synthetic if evaluation else cfg.eval.synthetic
        self.cost_steps = evaluation.sample_cost_steps if evaluation else 0.0
        self.clock: tuple[float, int] | None = None  # (time.monotonic(), step) at the first step

    def rank0_seconds(self, step: int) -> float:
        """How long the other ranks wait for rank 0's samples: SAMPLE_WAIT_S plus 4 times their cost
        in training steps at this run's pace so far (including its checkpoints and validation)."""
        if self.clock is None:
            return SAMPLE_WAIT_S
        started, first = self.clock
        per_step = (time.monotonic() - started) / max(1, step - first)
        return SAMPLE_WAIT_S + 4 * self.cost_steps * per_step

    def maybe_sample(self, step: int) -> None:
        """Samples at multiples of `train.sample_every` before the last step (the end samples anyway)."""
        self.clock = self.clock or (time.monotonic(), step)
        every = self.cfg.train.sample_every
        if every and step % every == 0 and step < self.cfg.train.max_steps:
            paths = self.sample(step)
            if self.logger:
                self.logger.log_videos(step, paths, self.cfg.train.sample_prompts)

    def sample(self, step: int) -> list[Path]:
        """Sample every prompt (when the run affords it); the paths on rank 0 (collective)."""
        if not self.sample_allowed:
            return []
        if self.averaged.sharded:
            with self.averaged.everywhere() as model:
                return sharded_samples(model, self.cfg, self.dist_info, step)
        replica = self.averaged.replica(everywhere=False)  # ZeRO-3 EMA: collective
        paths = write_samples(replica, self.cfg, step) if replica is not None else []
        wait_for_main("write the samples", self.rank0_seconds(step))
        return paths

    def finish(self, step: int) -> None:
        """The final samples (a `samples` event), with `eval.synthetic` the `eval_synthetic` scores
        and each clip's result (RUN_DIR/eval_synthetic/), then every rank's peak memory (a
        `peak_memory` event)."""
        cfg = self.cfg
        paths = self.sample(step)
        if self.logger:
            self.logger.log_videos(step, paths, cfg.train.sample_prompts)
            self.logger.log_event("samples", step, {"paths": [str(p) for p in paths]})
        if self.synthetic_allowed:
            scores, results = synthetic_scores(self.averaged.replica(everywhere=True), cfg, self.dist_info)
            if self.logger:
                self.logger.log_event("eval_synthetic", step, scores)
                save_clip_results(results, Path(cfg.run_dir) / RESULTS_DIR)
        peaks = all_gather_objects(peak_memory_bytes(self.dist_info.device))
        if self.logger:
            kind = "cuda_allocated" if self.dist_info.device.type == "cuda" else "host_resident"
            self.logger.log_event("peak_memory", step, {"kind": kind, "bytes_by_rank": peaks}, echo=False)
