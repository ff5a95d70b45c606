"""One optimizer step: accumulate micro-batches (forward, flow-matching loss, backward), let the
engine clip and step, update the EMA, and have the guards judge the outcome."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from ..batch_inputs import clean_latents, text_input
from ..config import TrainConfig
from ..data.loader import Batch
from ..diffusion.draws import draw_for_samples
from ..diffusion.flow import flow_loss
from ..ema import EMA
from ..guards import StepVerdict, TrainingGuards
from ..models.prompts import PromptEncoder
from ..models.vae import LatentSpace
from ..parallel.dist import all_reduce_mean
from ..parallel.sequence import check_group_batch
from ..throughput import attended_text_tokens, batch_flops, batch_tokens


class MicroBatch(NamedTuple):
    """What one micro-batch's forward and backward report."""

    loss: float
    text_tokens: int  # per sample, as the DiT attended to them (`throughput.attended_text_tokens`)


def forward_backward(
    engine, batch: Batch, prompts: PromptEncoder, latent_space: LatentSpace | None, step: int,
    cfg: TrainConfig, dtype: torch.dtype,
) -> MicroBatch:  # fmt: skip
    """One micro-batch of optimizer step `step`: encode (unless `latent_space` is None: the batch
    holds latents), noise at the configured timesteps, flow-matching loss, backward. Returns the
    loss and the text tokens per sample the DiT attended to.

    Each sample's caption dropout, timestep, noise and (with frame conditioning) frames kept clean
    come from (seed, its key, step) (`diffusion/draws.py`); kept frames carry no loss.
    """
    device = engine.device
    x0 = clean_latents(batch, latent_space, device, dtype)
    draws = draw_for_samples(
        batch["key"], step, cfg.seed, x0.shape, video_tokens(x0.shape, cfg), cfg.data.caption_dropout,
        cfg.diffusion,
    )  # fmt: skip
    text, mask = text_input(batch, prompts, draws.dropped, device, dtype)
    frame_mask = None if draws.frame_mask is None else draws.frame_mask.to(device)  # (B, f) bool
    # t and the noise stay float32: near t = 1 a bf16 t moves in steps of 1/256 (about 4 in diffusers'
    # 1000·t), and x_t = (1 - t)·x0 + t·noise is formed in float32 before it is cast for the model
    loss = flow_loss(
        lambda x_t, t_: engine(x_t, t_, text, mask, frame_mask), x0, draws.noise.to(device),
        draws.t.to(device), frame_mask, cfg.diffusion.loss_weighting,
    )  # fmt: skip
    engine.backward(loss)
    return MicroBatch(loss.item(), attended_text_tokens(mask, cfg.model.variant))


def video_tokens(shape: torch.Size, cfg: TrainConfig) -> int:
    """Video tokens per sample of a (B, C, F, H, W) batch of what the DiT denoises."""
    return batch_tokens(shape, None, tuple(cfg.model.patch_size)) // shape[0]


@dataclass
class StepOutcome:
    """What one optimizer step did. `loss` and `data_wait` are means over all ranks; `keys`,
    `tokens` and `flops` are this rank's."""

    loss: float
    data_wait: float  # fraction of the step spent waiting for batches
    seconds: float
    applied: bool  # False: a non-finite gradient norm discarded the step on all ranks
    verdict: StepVerdict
    keys: list[str]
    tokens: int
    flops: float
    epoch: int


@dataclass
class Stepper:
    """Everything a step touches: the engine, the EMA and guards, the encoders and the compute dtype."""

    engine: object  # deepspeed.DeepSpeedEngine
    ema: EMA
    guards: TrainingGuards
    prompts: PromptEncoder
    encoder: LatentSpace | None  # None: the batches hold precomputed latents
    cfg: TrainConfig
    dtype: torch.dtype
    accumulation: int
    sequence_group: dist.ProcessGroup | None = None  # its ranks must load the same batches

    def train_step(self, batches: Iterator[Batch], step: int) -> StepOutcome:
        """Optimizer step `step`: accumulate `accumulation` micro-batches, step (the engine clips and skips non-finite
        steps), update the EMA when the step was applied, and let the guards judge it (collective)."""
        started, data_wait, losses, keys, tokens, flops = time.perf_counter(), 0.0, [], [], 0, 0.0
        patch = tuple(self.cfg.model.patch_size)
        for _ in range(self.accumulation):
            fetch = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - fetch
            check_group_batch(batch["key"], self.sequence_group, self.engine.device)
            micro = forward_backward(
                self.engine, batch, self.prompts, self.encoder, step, self.cfg, self.dtype
            )
            self.engine.step()  # DeepSpeed counts micro-batches; the last one of a step updates the weights
            losses.append(micro.loss)
            keys.extend(batch["key"])
            micro_tokens = batch_tokens(batch["x"].shape, self.encoder, patch)
            tokens += micro_tokens
            flops += batch_flops(self.cfg, micro_tokens, len(batch["key"]), micro.text_tokens)
        applied = self.engine.was_step_applied()
        if applied:
            self.ema.update(self.engine.module)
        elapsed = time.perf_counter() - started
        loss, wait = all_reduce_mean([sum(losses) / len(losses), data_wait / elapsed], self.engine.device)
        verdict = self.guards.observe(applied, loss)
        return StepOutcome(loss, wait, elapsed, applied, verdict, keys, tokens, flops, batch["epoch"])
