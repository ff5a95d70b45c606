"""The validation loss on `data.val` with the EMA weights: every `eval.val_every` steps and at the end,
at the configured timesteps inside the trained range (a Wan 2.2 expert's, or `diffusion.t_min/t_max`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from ..config import TrainConfig
from ..data.loader import Batch
from ..data.recipe import build_loader
from ..diffusion.timesteps import timestep_range
from ..ema import EMA
from ..eval.validation import loss_sums, merge_sums, one_pass
from ..metrics import MetricsLogger
from ..models.prompts import PromptEncoder
from ..models.vae import LatentSpace
from ..parallel.dist import DistInfo
from ..parallel.sequence import apply_sequence_parallel, check_group_batch
from .averaged import ema_model
from .reporting import data_reports


class Validator:
    """Runs the validation pass when it is due (collective); logs a `validation` event on rank 0.

    Disabled (every call a no-op) without `data.val` or with `eval.validate=false`.
    """

    def __init__(
        self, cfg: TrainConfig, dist_info: DistInfo, ema: EMA, prompts: PromptEncoder, latent_space: LatentSpace,
        micro_batch: int, dtype: torch.dtype, logger: MetricsLogger | None,
    ):  # fmt: skip
        self.cfg, self.dist_info, self.ema, self.prompts = cfg, dist_info, ema, prompts
        self.latent_space, self.micro_batch, self.dtype, self.logger = (
            latent_space,
            micro_batch,
            dtype,
            logger,
        )
        self.enabled = cfg.eval.validate and cfg.data.val is not None

    def maybe_run(self, step: int) -> None:
        """Validate at multiples of `eval.val_every` before the last step (the end runs its own)."""
        every = self.cfg.eval.val_every
        if self.enabled and every and step % every == 0 and step < self.cfg.train.max_steps:
            self.run(step)

    def run(self, step: int) -> None:
        """The validation loss over data.val (or its first `eval.val_batches` batches per rank), per bucket."""
        if not self.enabled:
            return
        cfg, info = self.cfg, self.dist_info
        held_out = build_loader(
            cfg, info.data_rank, info.data_world, self.latent_space, self.micro_batch, split="val"
        )
        averaged = ema_model(self.ema, cfg, info, self.dtype)
        apply_sequence_parallel(averaged, info.sequence_group)
        encoder = None if cfg.data.precomputed else self.latent_space
        batches = group_checked(one_pass(held_out, cfg.eval.val_batches), info)
        sums = loss_sums(
            averaged, batches, self.prompts, encoder, cfg.eval.val_timesteps, cfg.seed, self.dtype,
            t_range=timestep_range(cfg.diffusion),
        )  # fmt: skip
        means = merge_sums(data_reports(info, sums))
        if self.logger:
            self.logger.log_event(
                "validation", step, {"val_loss": means.get("all"), "val_loss_by_bucket": means}
            )


def group_checked(batches: Iterable[Batch], info: DistInfo) -> Iterator[Batch]:
    """`batches`, each checked to be the one every rank of this rank's sequence-parallel group holds
    (`parallel.sequence.check_group_batch`; collective within the group)."""
    for batch in batches:
        check_group_batch(batch["key"], info.sequence_group, info.device)
        yield batch
