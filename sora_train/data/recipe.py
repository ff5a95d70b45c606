"""A run's data config -> its bucket table and its loader."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..models.patch import grid_size
from .buckets import Bucket, batch_sizes_for
from .loader import LoaderSettings, VideoLoader
from .storage import resolve_shards

if TYPE_CHECKING:
    from ..config import TrainConfig
    from ..models.vae import LatentSpace


def tokens_per_sample(bucket: Bucket, latent_space: LatentSpace, patch_size: tuple[int, int, int]) -> int:
    """Transformer tokens of one sample of `bucket`: its latent grid divided into patches."""
    _, frames, height, width = latent_space.latent_shape(bucket.frames, bucket.height, bucket.width)
    return math.prod(grid_size((frames, height, width), patch_size))


def build_loader(
    cfg: TrainConfig, rank: int, world: int, latent_space: LatentSpace, micro_batch: int, split: str = "train"
) -> VideoLoader:
    """The loader of data-parallel rank `rank` of `world` for this run (raises ValueError on bad data settings).

    `split="val"` reads data.val the same way, but always in the same order: no shuffle, centred
    clips, no images, decoded in this process.
    """
    data = cfg.data
    table = data.bucket_table()
    patch = tuple(cfg.model.patch_size)
    sizes = batch_sizes_for(
        table,
        data.tokens_per_batch,
        lambda bucket: tokens_per_sample(bucket, latent_space, patch),
        micro_batch,
    )
    settings = LoaderSettings(
        table=table,
        batch_sizes=sizes,
        seed=cfg.seed,
        shuffle_window=data.shuffle_buffer,
        window=data.window,
        target_fps=data.target_fps,
        max_upscale=data.max_upscale,
        latent_shapes=tuple(latent_space.latent_shape(b.frames, b.height, b.width) for b in table.buckets)
        if data.precomputed
        else None,
        image_ratio=data.image_ratio,
        num_workers=data.num_workers,
        decoder=data.decoder,
        decode_timeout=data.decode_timeout,
        worker_max_tasks=data.worker_max_tasks,
        cache_dir=Path(data.cache_dir) if data.cache_dir else None,
    )
    if split == "val":
        settings = replace(settings, shuffle_window=1, window="center", image_ratio=0.0, num_workers=0)
        return VideoLoader([resolve_shards(data.val, data.allow_pipe)], settings, rank, world)
    sources = [resolve_shards(data.train, data.allow_pipe)]
    if data.images is not None:
        sources.append(resolve_shards(data.images, data.allow_pipe))
    return VideoLoader(sources, settings, rank, world)
