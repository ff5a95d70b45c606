"""Data and sequence parallelism against one plain torch model, on 2 processes.

Run under torchrun with 2 processes. Rank 0 writes a JSON report to the path given as the first
argument:
- `forward`: per model variant and token grid, the largest difference between the
  sequence-parallel (SP=2) output and the whole-sequence output, and between their gradients (each
  rank's parameter gradients averaged over the ranks, as DeepSpeed does), for a grid whose token
  count divides the degree and for one that is padded; the variants are the cross-attention DiT
  and MM-DiT, both with a text stream that gives only keys and values in its last block and with
  a single-stream block;
- `training`: per layout (SP=2: both ranks share every clip; DP=2: each rank takes half the batch)
  and ZeRO stage (2, 3), the loss of each of 3 DeepSpeed steps and of the same steps taken by a
  plain torch model and optimizer on the whole batch, the largest difference between the final
  weights, the least any weight moved, the largest difference between the EMA weights and a plain
  EMA's, the share of the plain EMA's bytes each rank holds (1/2: sharded like the optimizer), and (ZeRO-2)
  the largest difference between the two ranks' weights.
Usage: torchrun --nproc-per-node 2 parallel_check.py OUT.json
"""

from __future__ import annotations

import copy
import itertools
import json
import sys

import torch
import torch.distributed as dist

from sora_train.config import DataConfig, ModelConfig, TrainConfig, TrainLoopConfig
from sora_train.diffusion.flow import flow_loss
from sora_train.ema import EMA
from sora_train.loop.engine import batch_layout, training_engine
from sora_train.models.denoiser import VideoDenoiser, build_denoiser, build_tokenizer
from sora_train.optim import build_optimizer, warmup_cosine
from sora_train.parallel.dist import init_distributed, leave_process, shutdown_distributed
from sora_train.parallel.sequence import apply_sequence_parallel

BATCH = 2
GRIDS = {"divides": (4, 16, 16), "padded": (6, 12, 12)}  # (F, H, W) pixels: 32 and 27 tokens at patch 2×4×4
VARIANTS = {
    "cross_attention": {},
    "mmdit": {"variant": "mmdit"},
    "mmdit_single": {"variant": "mmdit", "single_stream_blocks": 1},
}


def config(zero_stage: int = 2, sequence_parallel: int = 2, variant: str = "cross_attention") -> TrainConfig:
    cfg = TrainConfig(
        model=ModelConfig(preset="test", hidden_size=32, depth=2, num_heads=2, patch_size=[2, 4, 4], text_dim=32,
                          text_depth=1, text_heads=2, text_vocab_size=256, absolute_positions=True,
                          **VARIANTS[variant]),
        data=DataConfig(train="unused", num_frames=4, height=16, width=16),
        train=TrainLoopConfig(global_batch_size=BATCH, grad_clip=1.0, max_steps=3),
        run_dir="unused",
    )  # fmt: skip
    cfg.parallel.zero_stage = zero_stage
    cfg.parallel.sequence_parallel = sequence_parallel
    cfg.optim.warmup_steps = 1
    return cfg


def inputs(cfg: TrainConfig, frames: int, height: int, width: int) -> tuple:
    """The same clips, noise, timesteps and captions on every rank."""
    data = torch.Generator().manual_seed(1)
    x0 = torch.rand(BATCH, 3, frames, height, width, generator=data) * 2 - 1
    noise = torch.randn(x0.shape, generator=data)
    t = torch.rand(BATCH, generator=data)
    ids, mask = build_tokenizer(cfg.model)(["a red square moving left", "a blue circle"])
    return x0, noise, t, ids, mask


def fresh_model(cfg: TrainConfig) -> VideoDenoiser:
    torch.manual_seed(0)
    model = build_denoiser(cfg.model)
    for p in model.parameters():  # move the zero-initialised adaLN and output weights off zero
        p.data += 0.02 * torch.randn(p.shape)
    return model


def grads(model: VideoDenoiser) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def compare_forward(group) -> dict:
    report = {}
    for variant, (grid, shape) in itertools.product(VARIANTS, GRIDS.items()):
        cfg = config(variant=variant)
        x0, noise, t, ids, mask = inputs(cfg, *shape)
        whole = fresh_model(cfg)
        split = copy.deepcopy(whole)
        apply_sequence_parallel(split, group)
        outputs, gradients = [], []
        for model in (whole, split):
            out = model(x0, t, ids, mask)
            ((out - noise) ** 2).mean().backward()
            outputs.append(out.detach())
            gradients.append(grads(model))
        dist.all_reduce(gradients[1])  # DeepSpeed's mean over every rank
        gradients[1] /= dist.get_world_size()
        report[f"{variant} {grid}"] = {
            "output": (outputs[0] - outputs[1]).abs().max().item(),
            "output_scale": outputs[0].abs().max().item(),
            "grad": (gradients[0] - gradients[1]).abs().max().item(),
            "grad_scale": gradients[0].abs().max().item(),
        }
    return report


def gathered_weights(engine) -> list[torch.Tensor]:
    params = list(engine.module.parameters())
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().clone() for p in params]
    return [p.detach().clone() for p in params]


def compare_training(zero_stage: int, layout: str, group) -> dict:
    """3 DeepSpeed steps of `layout` (SP: both ranks take the whole batch split by tokens; DP: each
    rank half of it) against 3 steps of a plain model on the whole batch."""
    cfg = config(zero_stage, sequence_parallel=2 if layout == "SP" else 1)
    x0, noise, t, ids, mask = inputs(cfg, *GRIDS["padded"])
    reference = fresh_model(cfg)
    model = copy.deepcopy(reference)
    share = slice(None)
    if layout == "SP":
        apply_sequence_parallel(model, group)
    else:
        rank = dist.get_rank()
        share = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
    engine = training_engine(
        model, cfg, batch_layout(cfg, dist.get_world_size() // cfg.parallel.sequence_parallel)
    )
    ema, reference_ema = EMA(engine.module, decay=0.9), EMA(reference, decay=0.9)
    optimizer = build_optimizer(reference, cfg.optim)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, 1, cfg.train.max_steps, cfg.optim.min_lr_ratio)
    )
    losses, reference_losses = [], []
    for _ in range(cfg.train.max_steps):
        loss = flow_loss(
            lambda x_t, t_: engine(x_t, t_, ids[share], mask[share]), x0[share], noise[share], t[share]
        )
        engine.backward(loss)
        engine.step()
        ema.update(engine.module)
        mean = loss.detach().clone()
        if layout == "DP":  # the whole batch's loss: the mean of the two halves'
            dist.all_reduce(mean)
            mean /= 2
        losses.append(mean.item())
        optimizer.zero_grad()
        loss = flow_loss(lambda x_t, t_: reference(x_t, t_, ids, mask), x0, noise, t)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), cfg.train.grad_clip)
        optimizer.step()
        schedule.step()
        reference_ema.update(reference)
        reference_losses.append(loss.item())
    trained = gathered_weights(engine)
    report = {
        "losses": losses,
        "reference_losses": reference_losses,
        "weights": max(
            (a - b).abs().max().item() for a, b in zip(trained, reference.parameters(), strict=True)
        ),
        "least_moved": min(
            (a - b).abs().max().item() for a, b in zip(trained, fresh_model(cfg).parameters(), strict=True)
        ),
    }
    averaged, expected = ema.state_dict(), reference_ema.state_dict()
    report["ema"] = max((averaged[k] - expected[k]).abs().max().item() for k in expected)
    report["ema_bytes_share"] = ema.local_bytes() / reference_ema.local_bytes()  # 1/2 when sharded
    if zero_stage < 3:  # every rank holds every weight: the copies must be identical
        mine = torch.cat([w.flatten() for w in trained])
        theirs = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(theirs, mine)
        report["between_ranks"] = max((other - mine).abs().max().item() for other in theirs)
    return report


def main(out: str) -> None:
    info = init_distributed(sequence_parallel=2)
    torch.set_num_threads(1)
    report = {"forward": compare_forward(info.sequence_group)}
    report["training"] = {
        f"{layout} ZeRO-{stage}": compare_training(stage, layout, info.sequence_group)
        for layout in ("SP", "DP")
        for stage in (2, 3)
    }
    if info.rank == 0:
        with open(out, "w") as file:
            json.dump(report, file, indent=1)
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
    leave_process(0)
