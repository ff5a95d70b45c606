"""The EMA weights as a plain model, for validation, samples and evaluation."""

from __future__ import annotations

import torch

from ..config import TrainConfig
from ..ema import EMA
from ..models.denoiser import VideoDenoiser
from ..parallel.attention_backend import apply_attention_backend
from ..parallel.dist import DistInfo
from ..pretrained import assemble_model


def ema_model(
    ema: EMA, cfg: TrainConfig, dist_info: DistInfo, dtype: torch.dtype, everywhere: bool = True
) -> VideoDenoiser | None:
    """A plain model holding the EMA weights (with LoRA: the averaged adapters on the base weights of
    `model.init_from`), on this rank's device in the run's compute `dtype` (the frozen encoders feed
    it that dtype; the fp32 EMA is rounded once), in eval mode, its attention on the kernels
    `train.attention_backend` chooses.

    Collective when the EMA is sharded (ZeRO-3). With `everywhere` False only the main rank builds
    the model (the others get None), so only the rank that samples holds a whole replica.
    """
    weights = ema.state_dict(only_rank=None if everywhere else 0)
    if not (everywhere or dist_info.is_main):
        return None
    model = assemble_model(cfg.model, weights).to(dist_info.device, dtype).eval()
    apply_attention_backend(model, cfg.train.attention_backend, dist_info.device)
    return model
