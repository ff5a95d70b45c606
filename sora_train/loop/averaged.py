"""The EMA weights as a model, for validation, samples and evaluation, in the run's layout
(`sora_train/eval/affordable.py` decides which evaluations run):

- sharded (ZeRO-3): the training engine's own partitioned model with each rank's EMA partition
  swapped in for its working partition (`swapped_in`). Every rank takes part in every forward
  (ZeRO-3 gathers each block's weights from all ranks as it runs), no rank holds a whole model, and
  the working partitions are put back exactly afterwards, so training goes on bitwise as before.
- replica (below ZeRO-3, and `eval.synthetic`): a plain model built from the gathered EMA weights
  (`ema_model`), on every rank or on rank 0 alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..config import TrainConfig
from ..ema import EMA
from ..models.denoiser import VideoDenoiser
from ..parallel.attention_backend import apply_attention_backend
from ..parallel.dist import DistInfo
from ..parallel.sequence import apply_sequence_parallel
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


def _write_partitions(params: list[nn.Parameter], values: list[torch.Tensor]) -> None:
    """Copy each value into its parameter's ZeRO-3 partition (`ds_tensor`), cast to its dtype."""
    with torch.no_grad():
        for param, value in zip(params, values, strict=True):
            param.ds_tensor.copy_(value)


@contextmanager
def swapped_in(engine, ema: EMA) -> Iterator[nn.Module]:
    """The ZeRO-3 engine's module, in eval mode, holding the EMA weights (collective, on every rank).

    Each rank writes its EMA partition (fp32, rounded once to the compute dtype) over its working
    partition, keeping a copy of the latter (1/world of the trainable weights). DeepSpeed's own
    checkpoint hooks bracket each swap: every parameter is partitioned first (so no gathered copy
    outlives it), and the parameters kept whole on every rank (`ds_persist`) are gathered again from
    the new partitions after. Frozen parameters (a LoRA base) are not in the EMA and stay as they are.
    The working partitions come back when the block ends normally; after an error the run is over.
    """
    module, optimizer = engine.module, engine.optimizer
    named = dict(module.named_parameters())
    params = [named[name] for name in ema.names]
    optimizer.checkpoint_event_prologue()
    working = [param.ds_tensor.detach().clone() for param in params]
    _write_partitions(params, [ema.shadow[name] for name in ema.names])
    optimizer.checkpoint_event_epilogue()
    training = module.training
    module.eval()
    yield module
    optimizer.checkpoint_event_prologue()
    _write_partitions(params, working)
    optimizer.checkpoint_event_epilogue()
    module.train(training)


class AveragedWeights:
    """The EMA weights to evaluate, in the layout of the run: sharded under ZeRO-3, else a replica.

    Every method is collective (every rank calls it).
    """

    def __init__(self, ema: EMA, engine, cfg: TrainConfig, dist_info: DistInfo, dtype: torch.dtype):
        self.ema, self.engine, self.cfg, self.dist_info, self.dtype = ema, engine, cfg, dist_info, dtype
        self.sharded = cfg.parallel.zero_stage == 3

    @contextmanager
    def everywhere(self) -> Iterator[nn.Module]:
        """A model holding the EMA weights on every rank, its tokens split over the sequence-parallel
        group: the engine's (sharded: ranks must run the same forwards in the same order) or a replica."""
        if self.sharded:
            with swapped_in(self.engine, self.ema) as module:
                yield module
            return
        replica = ema_model(self.ema, self.cfg, self.dist_info, self.dtype)
        apply_sequence_parallel(replica, self.dist_info.sequence_group)
        yield replica

    def replica(self, everywhere: bool) -> VideoDenoiser | None:
        """A whole plain model holding the EMA weights on every rank, or on rank 0 alone (`ema_model`)."""
        return ema_model(self.ema, self.cfg, self.dist_info, self.dtype, everywhere=everywhere)
