"""One ZeRO optimizer step on a fixed batch of 4 clips, split over however many ranks torchrun starts.

Three steps; rank r trains on its contiguous share of the batch; rank 0 saves the mean loss and the
updated weights to the path given as the first argument.
Usage: torchrun --nproc-per-node N dp_step.py OUT.pt ZERO_STAGE
"""

from __future__ import annotations

import sys

import torch

from sora_train.config import DataConfig, ModelConfig, TrainConfig, TrainLoopConfig
from sora_train.diffusion.flow import flow_loss
from sora_train.models.denoiser import build_denoiser, build_tokenizer
from sora_train.parallel.dist import all_reduce_mean, init_distributed, shutdown_distributed
from sora_train.parallel.zero import build_engine

BATCH = 4


def main(out: str, zero_stage: int) -> None:
    info = init_distributed()
    torch.set_num_threads(1)
    cfg = TrainConfig(
        model=ModelConfig(preset="test", hidden_size=32, depth=2, num_heads=2, patch_size=[2, 4, 4], text_dim=32,
                          text_depth=1, text_heads=2, text_vocab_size=256),
        data=DataConfig(train="unused", num_frames=4, height=16, width=16),
        train=TrainLoopConfig(global_batch_size=BATCH, grad_clip=1.0),
        run_dir="unused",
    )  # fmt: skip
    cfg.parallel.zero_stage = zero_stage
    cfg.optim.warmup_steps = 1
    torch.manual_seed(0)
    model = build_denoiser(cfg.model)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    engine = build_engine(model, cfg, info.world_size)

    data = torch.Generator().manual_seed(1)
    x0 = torch.rand(BATCH, 3, 4, 16, 16, generator=data) * 2 - 1
    noise = torch.randn(BATCH, 3, 4, 16, 16, generator=data)
    t = torch.rand(BATCH, generator=data)
    ids, mask = build_tokenizer(cfg.model)([f"a shape moving {d}" for d in ("left", "right", "up", "down")])
    share = slice(info.rank * BATCH // info.world_size, (info.rank + 1) * BATCH // info.world_size)
    ids, mask = ids[share], mask[share]
    for _ in range(3):  # adaLN-Zero: the third step is the first to move every weight
        loss = flow_loss(lambda x_t, t_: engine(x_t, t_, ids, mask), x0[share], noise[share], t[share])
        engine.backward(loss)
        engine.step()
    (mean_loss,) = all_reduce_mean([loss.item()], info.device)
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            weights = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    else:
        weights = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    if info.rank == 0:
        torch.save({"loss": mean_loss, "weights": weights, "initial": initial}, out)
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
