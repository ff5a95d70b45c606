"""Samples from the EMA weights during training (every `train.sample_every` steps) and at the end,
then the synthetic task's prompt-following evaluation when `eval.synthetic`."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import TrainConfig
from ..ema import EMA
from ..eval.synthetic_eval import evaluate_prompts, held_out_prompts
from ..generate import generate_videos, save_clips
from ..metrics import MetricsLogger
from ..models.denoiser import VideoDenoiser
from ..parallel.dist import DistInfo, all_gather_objects, barrier
from ..pretrained import inference_config
from .averaged import ema_model


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


def synthetic_scores(model: VideoDenoiser, cfg: TrainConfig, dist_info: DistInfo) -> dict:
    """Prompt-following accuracy on held-out prompts, split over the ranks (collective)."""
    prompts = held_out_prompts(cfg.data.val, cfg.eval.num_prompts)[dist_info.rank :: dist_info.world_size]
    counts = evaluate_prompts(model, inference_config(cfg), prompts, cfg.eval.batch_size, seed=cfg.seed)
    color, motion, clips = (sum(values) for values in zip(*all_gather_objects(counts), strict=True))
    return {"color_acc": color / max(1, clips), "motion_acc": motion / max(1, clips), "num_clips": clips}


class Sampler:
    """Rank 0 samples the configured prompts; at the end every rank evaluates a share of the
    synthetic prompts when asked to (all methods collective)."""

    def __init__(
        self,
        cfg: TrainConfig,
        dist_info: DistInfo,
        ema: EMA,
        dtype: torch.dtype,
        logger: MetricsLogger | None,
    ):
        self.cfg, self.dist_info, self.ema, self.dtype, self.logger = cfg, dist_info, ema, dtype, logger

    def maybe_sample(self, step: int) -> None:
        """Samples at multiples of `train.sample_every` before the last step (the end samples anyway)."""
        every = self.cfg.train.sample_every
        if not (every and step % every == 0 and step < self.cfg.train.max_steps):
            return
        averaged = ema_model(
            self.ema, self.cfg, self.dist_info, self.dtype, everywhere=False
        )  # ZeRO-3: collective
        if self.logger:
            paths = write_samples(averaged, self.cfg, step)
            self.logger.log_videos(step, paths, self.cfg.train.sample_prompts)
        barrier()

    def finish(self, step: int) -> None:
        """The final samples (a `samples` event) and, with `eval.synthetic`, the `eval_synthetic` scores."""
        cfg = self.cfg
        # every rank evaluates a share of the synthetic prompts; otherwise only rank 0 samples
        final_model = ema_model(self.ema, cfg, self.dist_info, self.dtype, everywhere=cfg.eval.synthetic)
        if self.logger:
            paths = write_samples(final_model, cfg, step)
            self.logger.log_videos(step, paths, cfg.train.sample_prompts)
            self.logger.log_event("samples", step, {"paths": [str(p) for p in paths]})
        if cfg.eval.synthetic:
            scores = synthetic_scores(final_model, cfg, self.dist_info)
            if self.logger:
                self.logger.log_event("eval_synthetic", step, scores)
