"""Sequence parallelism (SP=2) of `model.variant=wan` against the whole sequence on one process.

Run under torchrun with 2 processes (gloo on CPU). Rank 0 writes a JSON report to the path given as
the first argument: per case, the largest difference between the SP=2 output and the single-process
output, and between their parameter gradients after one backward (each rank's gradients averaged
over the ranks, as DeepSpeed does). Cases: a token count that divides the degree (2x4x6 latents at
patch 1x2x2: 12 tokens), one that is padded (3x6x6: 27 tokens), the padded one with frame
conditioning (per-token timesteps, split with the tokens), and an image-to-video model (padded).
Usage: torchrun --nproc-per-node 2 wan_parallel_check.py OUT.json
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist

from sora_train.models.denoiser import FrozenTextEmbeddings, VideoDenoiser
from sora_train.models.wan import WanShape, WanTransformer
from sora_train.parallel.dist import leave_process, shutdown_distributed
from sora_train.parallel.sequence import apply_sequence_parallel, sequence_groups

SHAPE = WanShape(hidden_size=32, depth=2, num_heads=4, ffn_dim=48, patch_size=(1, 2, 2), in_channels=4,
                 out_channels=4, text_dim=16, frame_conditioning=True)  # fmt: skip
CASES = {
    "t2v divides": (SHAPE, (2, 4, 6), False),
    "t2v padded": (SHAPE, (3, 6, 6), False),
    "frame conditioned padded": (SHAPE, (3, 6, 6), True),
    "i2v padded": (WanShape(**{**SHAPE.__dict__, "in_channels": 6, "image_dim": 8, "added_kv_proj_dim": 32}),
                   (3, 6, 6), False),
}  # fmt: skip


def inputs(shape: WanShape, size: tuple[int, int, int], conditioned: bool) -> dict:
    """The same latents, timesteps, captions (and image features, frame masks) on every rank."""
    generator = torch.Generator().manual_seed(1)
    mask = torch.tensor([[True] * 5 + [False] * 2, [True] * 2 + [False] * 5])
    return {
        "x": torch.randn(2, shape.in_channels, *size, generator=generator),
        "t": torch.tensor([0.3, 0.8]),
        "text": torch.randn(2, 7, shape.text_dim, generator=generator),
        "text_mask": mask,
        "frame_mask": torch.tensor([[True, False, False], [True, True, False]]) if conditioned else None,
        "image": torch.randn(2, 5, shape.image_dim, generator=generator) if shape.image_dim else None,
    }


def compare(shape: WanShape, size: tuple[int, int, int], conditioned: bool, group) -> dict:
    torch.manual_seed(0)
    whole = VideoDenoiser(WanTransformer(shape), FrozenTextEmbeddings())
    split = copy.deepcopy(whole)
    apply_sequence_parallel(split, group)
    given = inputs(shape, size, conditioned)
    noise = torch.randn(2, shape.out_channels, *size, generator=torch.Generator().manual_seed(2))
    outputs, gradients = [], []
    for model in (whole, split):
        out = model.dit(**given)
        ((out - noise) ** 2).mean().backward()
        outputs.append(out.detach())
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    dist.all_reduce(gradients[1])  # DeepSpeed's mean over every rank
    gradients[1] /= dist.get_world_size()
    return {
        "output": (outputs[0] - outputs[1]).abs().max().item(),
        "grad": (gradients[0] - gradients[1]).abs().max().item(),
    }


def main(out: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    group = sequence_groups(2)
    report = {name: compare(*case, group) for name, case in CASES.items()}
    if dist.get_rank() == 0:
        with open(out, "w") as file:
            json.dump(report, file, indent=1)
    shutdown_distributed()  # every rank done before gloo is torn down


if __name__ == "__main__":
    main(sys.argv[1])
    leave_process(0)
