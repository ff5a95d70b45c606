"""The validation loss on `data.val` with the EMA weights: every `eval.val_every` steps and at the end,
at the configured timesteps inside the trained range (a Wan 2.2 expert's, or `diffusion.t_min/t_max`).

Under ZeRO-3 it runs in the sharded layout (`averaged.py`): every forward gathers weights from all
ranks, so ranks whose share of the held-out split is shorter run copies of a batch they hold
(`in_lockstep`), whose losses are not counted."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch.distributed as dist
from torch import nn

from ..config import TrainConfig
from ..data.loader import Batch
from ..data.recipe import build_loader
from ..diffusion.timesteps import timestep_range
from ..eval.validation import loss_sums, merge_sums, one_pass
from ..metrics import MetricsLogger
from ..models.prompts import PromptEncoder
from ..models.vae import LatentSpace
from ..parallel.dist import DistInfo, all_gather_objects
from ..parallel.sequence import check_group_batch
from .averaged import AveragedWeights
from .reporting import data_reports


class Validator:
    """Runs the validation pass when it is due (collective); logs a `validation` event on rank 0.

    Disabled (every call a no-op) without `data.val`, with `eval.validate=false`, or when the run
    cannot afford it (`allowed` False: `sora_train/eval/affordable.py`).
    """

    def __init__(
        self, cfg: TrainConfig, dist_info: DistInfo, averaged: AveragedWeights, prompts: PromptEncoder,
        latent_space: LatentSpace, micro_batch: int, logger: MetricsLogger | None, allowed: bool = True,
    ):  # fmt: skip
        self.cfg, self.dist_info, self.averaged, self.prompts = cfg, dist_info, averaged, prompts
        self.latent_space, self.micro_batch, self.logger = latent_space, micro_batch, logger
        self.enabled = cfg.eval.validate and cfg.data.val is not None and allowed

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
        batches = group_checked(one_pass(held_out, cfg.eval.val_batches), info)
        with self.averaged.everywhere() as model:
            if self.averaged.sharded:
                sums = self.lockstep_sums(model, batches)
            else:
                sums = self.loss_sums(model, batches)
        means = merge_sums(data_reports(info, sums))
        if self.logger:
            self.logger.log_event(
                "validation", step, {"val_loss": means.get("all"), "val_loss_by_bucket": means}
            )

    def loss_sums(self, model: nn.Module, batches: Iterable[Batch]) -> dict[str, list[float]]:
        """`eval.validation.loss_sums` of `batches` with this run's settings."""
        cfg = self.cfg
        encoder = None if cfg.data.precomputed else self.latent_space
        return loss_sums(
            model, batches, self.prompts, encoder, cfg.eval.val_timesteps, cfg.seed, self.averaged.dtype,
            t_range=timestep_range(cfg.diffusion),
        )  # fmt: skip

    def lockstep_sums(self, model: nn.Module, batches: Iterable[Batch]) -> dict[str, list[float]]:
        """`loss_sums` with every rank running the same number of batches (`in_lockstep`); the
        copies that keep a rank in step are not counted."""
        sums: dict[str, list[float]] = {}
        for batch, counted in in_lockstep(batches):
            part = self.loss_sums(model, [batch])  # a copy runs too: every rank runs every forward
            for bucket, (loss, clips) in part.items() if counted else ():
                entry = sums.setdefault(bucket, [0.0, 0])
                entry[0] += loss
                entry[1] += clips
        return sums


def in_lockstep(batches: Iterable[Batch]) -> Iterator[tuple[Batch, bool]]:
    """(batch, True) for each of this rank's `batches`, then (a copy of its last batch, False) until
    every rank has run out (collective: one small gather per batch).

    A rank with no batch at all borrows the first batch of the lowest rank that has one.
    """
    iterator, last = iter(batches), None
    while True:
        batch = next(iterator, None)
        held = all_gather_objects(batch is not None)
        if not any(held):
            return
        if last is None and not all(held):  # the first round: some rank has nothing to repeat
            lender = held.index(True)
            lent = all_gather_objects(batch if dist.get_rank() == lender else None)[lender]
            last = lent if batch is None else batch
        if batch is not None:
            last = batch
        yield (batch, True) if batch is not None else (last, False)


def group_checked(batches: Iterable[Batch], info: DistInfo) -> Iterator[Batch]:
    """`batches`, each checked to be the one every rank of this rank's sequence-parallel group holds
    (`parallel.sequence.check_group_batch`; collective within the group)."""
    for batch in batches:
        check_group_batch(batch["key"], info.sequence_group, info.device)
        yield batch
