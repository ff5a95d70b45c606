"""Validation loss: the flow-matching loss on the held-out split at fixed timesteps, per bucket.

The same clips, timesteps and noise every time (each clip's noise is seeded by its key), so
values are comparable across evaluations, runs of a sweep and numbers of ranks. The model holds
the EMA weights; its only collectives are within a sequence-parallel group, whose ranks read the
same batches, so different data-parallel ranks need not see the same number of batches. A model
trained on part of the timesteps (an expert, or `diffusion.t_min`/`t_max`) is validated inside
that range only (`validation_timesteps`).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator

import torch
from einops import reduce
from torch import nn

from ..batch_inputs import clean_latents, text_input
from ..data.loader import Batch
from ..diffusion.flow import flow_errors
from ..diffusion.timesteps import FULL_RANGE, TimestepRange
from ..models.prompts import PromptEncoder
from ..models.vae import LatentSpace


def validation_timesteps(configured: list[float], t_range: TimestepRange = FULL_RANGE) -> list[float]:
    """The configured validation timesteps inside `t_range`, in their order; when none is inside,
    the centres of as many equal parts of the range (one part without configured timesteps).

    E.g. [0.1, 0.3, 0.5, 0.7, 0.9] keeps [0.9] for the high-noise expert of boundary 0.875 and
    [0.1, 0.3, 0.5, 0.7] for the low-noise one; a range [0.92, 0.97] gets its centres of fifths,
    0.925, 0.935, ..., 0.965. The full range keeps them all.
    """
    inside = [t for t in configured if t_range.contains(t)]
    if inside or t_range.full:
        return inside
    parts = max(1, len(configured))
    width = (t_range.high - t_range.low) / parts
    return [t_range.low + (i + 0.5) * width for i in range(parts)]


def clip_noise(keys: list[str], shape: torch.Size, seed: int) -> torch.Tensor:
    """(B, ...) standard normal noise, each clip's drawn from a generator seeded by its key."""
    return torch.stack([
        torch.randn(shape[1:], generator=torch.Generator().manual_seed(seed + zlib.crc32(key.encode())))
        for key in keys
    ])  # fmt: skip


@torch.no_grad()
def loss_sums(
    model: nn.Module, batches: Iterable[Batch], prompts: PromptEncoder, latent_space: LatentSpace | None,
    timesteps: list[float], seed: int, dtype: torch.dtype, t_range: TimestepRange = FULL_RANGE,
) -> dict[str, list[float]]:  # fmt: skip
    """{bucket: [sum over clips of the loss averaged over `timesteps`, clips]} for this rank's batches.

    `latent_space` None: the batches already hold latents. Only timesteps inside `t_range` count
    (`validation_timesteps`).
    """
    timesteps = validation_timesteps(timesteps, t_range)
    sums: dict[str, list[float]] = {}
    device = next(model.parameters()).device
    for batch in batches:
        x0 = clean_latents(batch, latent_space, device, dtype)
        text, mask = text_input(batch, prompts, None, device, dtype)
        noise = clip_noise(batch["key"], x0.shape, seed).to(device)  # float32, as t (see flow_errors)
        per_clip = torch.zeros(x0.shape[0], device=device)
        for value in timesteps:
            t = torch.full((x0.shape[0],), value, device=device)
            errors = flow_errors(lambda x_t, t_: model(x_t, t_, text, mask), x0, noise, t)  # noqa: B023 (called at once)
            per_clip += reduce(errors, "b ... -> b", "mean")  # the flow-matching loss of each clip
        bucket = sums.setdefault(batch["bucket"], [0.0, 0])
        bucket[0] += float(per_clip.sum()) / len(timesteps)
        bucket[1] += x0.shape[0]
    return sums


def one_pass(batches: Iterable[Batch], limit: int = 0) -> Iterator[Batch]:
    """The first epoch of a loader's batches, or its first `limit` batches (0: no limit)."""
    for count, batch in enumerate(batches):
        if batch["epoch"] > 0 or (limit and count >= limit):
            return
        yield batch


def merge_sums(per_rank: list[dict[str, list[float]]]) -> dict[str, float]:
    """Mean loss per bucket and overall ("all", weighted by clips) from every rank's `loss_sums`."""
    total: dict[str, list[float]] = {}
    for sums in per_rank:
        for bucket, (loss, clips) in sums.items():
            entry = total.setdefault(bucket, [0.0, 0])
            entry[0] += loss
            entry[1] += clips
    means = {bucket: loss / clips for bucket, (loss, clips) in sorted(total.items()) if clips}
    clips = sum(count for _, count in total.values())
    if clips:
        means["all"] = sum(loss for loss, _ in total.values()) / clips
    return means
