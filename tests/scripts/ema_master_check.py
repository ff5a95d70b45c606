"""The EMA follows DeepSpeed's fp32 master weights in bf16, under ZeRO-1, 2 and 3, on 2 processes.

For each stage, 4 bf16 DeepSpeed steps of data parallelism (each rank half of the batch), with the
trainer's EMA updated after each step, next to a reference EMA kept whole on every rank from the
full fp32 master weights (DeepSpeed's `safe_get_full_fp32_param`) and a naive EMA of the bf16
module weights. Rank 0 writes a JSON report to the path given as the first argument, per stage:
- `master`: the largest difference between the trainer's EMA and the reference (0: exact);
- `naive`: the largest difference between the reference and the naive EMA (> 0: bf16 rounding);
- `share`: the bytes of EMA this rank holds over the whole EMA's (1/2: sharded);
- `reloaded`: after restoring a fresh EMA from the saved whole weights and one more update of
  both, the largest difference between them (0: a resume continues exactly).
Usage: torchrun --nproc-per-node 2 ema_master_check.py OUT.json
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param
from parallel_check import BATCH, config, fresh_model, inputs

from sora_train.diffusion.flow import flow_loss
from sora_train.ema import EMA
from sora_train.loop.engine import batch_layout, training_engine
from sora_train.parallel.dist import init_distributed, leave_process, shutdown_distributed

STEPS = 4
DECAY = 0.5  # fast enough that every step's weights show in the average


def full_weights(engine, master: bool) -> dict[str, torch.Tensor]:
    """Every trainable parameter whole (collective): the fp32 master weights, or the module's bf16 ones."""
    import deepspeed

    named = [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]
    if master:
        return {name: safe_get_full_fp32_param(p).float().cpu() for name, p in named}
    with deepspeed.zero.GatheredParameters([p for _, p in named], enabled=hasattr(named[0][1], "ds_id")):
        return {name: p.detach().float().cpu().clone() for name, p in named}


def largest_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[name] - b[name]).abs().max().item() for name in b)


def check_stage(zero_stage: int) -> dict:
    cfg = config(zero_stage, sequence_parallel=1)
    cfg.train.precision, cfg.train.max_steps = "bf16", STEPS + 1
    rank = dist.get_rank()
    x0, noise, t, ids, mask = inputs(cfg, 4, 16, 16)
    share = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
    engine = training_engine(fresh_model(cfg), cfg, batch_layout(cfg, dist.get_world_size()))
    ema = EMA(engine.module, DECAY)
    reference, naive = full_weights(engine, master=True), full_weights(engine, master=False)

    def step() -> None:
        loss = flow_loss(
            lambda x_t, t_: engine(x_t.bfloat16(), t_, ids[share], mask[share]),
            x0[share],
            noise[share],
            t[share],
        )
        engine.backward(loss)
        engine.step()
        ema.update(engine.module)

    for index in range(STEPS):
        step()
        decay = min(DECAY, (1 + index) / (10 + index))
        for averaged, master in ((reference, True), (naive, False)):
            for name, weights in full_weights(engine, master).items():
                averaged[name].lerp_(weights, 1 - decay)
    report = {
        "master": largest_gap(ema.state_dict(), reference),
        "naive": largest_gap(naive, reference),
        "share": ema.local_bytes() / sum(w.numel() * 4 for w in reference.values()),
    }
    restored = EMA(engine.module, DECAY)
    restored.load_state_dict(ema.state_dict(), ema.updates)
    step()
    restored.update(engine.module)
    report["reloaded"] = largest_gap(restored.state_dict(), ema.state_dict())
    engine.destroy()
    return report


def main(out: str) -> None:
    init_distributed()
    torch.set_num_threads(1)
    report = {f"ZeRO-{stage}": check_stage(stage) for stage in (1, 2, 3)}
    if dist.get_rank() == 0:
        with open(out, "w") as file:
            json.dump(report, file, indent=1)
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
    leave_process(0)
