"""Ulysses attention over a padded sequence without a key mask, against whole-sequence attention.

Run under torchrun with 2 processes (gloo). Rank 0 writes a JSON report to the path given as the
first argument:
- `layout`: per dtype (float32, bfloat16) and attention kind (self-attention; MM-DiT joint attention
  with uniform captions, no mask, and with captions of different lengths, a text mask), the largest
  difference between the sequence-parallel output over 27 tokens (padded to 28, split 14 + 14) and
  plain float32 attention over the whole sequence (the text mask as given), and between their
  gradients with respect to every input, each with the reference's largest magnitude;
- `models`: the same for the whole denoiser (cross-attention DiT, MM-DiT, MM-DiT with a
  single-stream block; uniform captions) on a 27-token grid split over the ranks against the
  whole model in the same dtype, with parameter gradients averaged over the ranks;
- in each entry, `masked_calls`: how many SDPA calls under sequence parallelism got a mask (none
  should, but for the captions of different lengths);
- `backends`: the layout's kernels after `apply_attention_backend` then `apply_sequence_parallel`,
  and after the reverse order.
Usage: torchrun --nproc-per-node 2 attention_masks_check.py OUT.json
"""

from __future__ import annotations

import copy
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch.overrides import TorchFunctionMode

from sora_train.config import ModelConfig
from sora_train.models.attention import attention, joint_attention
from sora_train.models.denoiser import VideoDenoiser, build_denoiser, build_tokenizer
from sora_train.parallel.attention_backend import apply_attention_backend
from sora_train.parallel.sequence import UlyssesLayout, apply_sequence_parallel, sequence_groups

BATCH, HEADS, HEAD_DIM, LENGTH, TEXT = 2, 4, 8, 27, 6  # 27 tokens: padded to 28 over 2 ranks
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CAPTIONS = {
    "uniform": ["a red square moving left", "a blue circle moving up"],  # 6 tokens each
    "ragged": ["a red square moving left", "a blue circle"],  # 6 and 4 tokens
}
VARIANTS = {
    "cross_attention": {},
    "mmdit": {"variant": "mmdit"},
    "mmdit_single": {"variant": "mmdit", "single_stream_blocks": 1},
}


class CountMaskedSDPA(TorchFunctionMode):
    """Counts the SDPA calls that get an `attn_mask`."""

    def __init__(self) -> None:
        super().__init__()
        self.masked = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and kwargs.get("attn_mask") is not None:
            self.masked += 1
        return func(*args, **kwargs)


def gap(ours: torch.Tensor, reference: torch.Tensor) -> dict:
    """The largest difference and the reference's largest magnitude, in float32."""
    return {
        "gap": (ours.float() - reference.float()).abs().max().item(),
        "scale": reference.float().abs().max().item(),
    }


def whole_inputs(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The same queries, keys and values on every rank: video (B, N, L, K), text (B, N, T, K)."""
    generator = torch.Generator().manual_seed(0)
    shapes = {"video": (BATCH, HEADS, LENGTH, HEAD_DIM), "text": (BATCH, HEADS, TEXT, HEAD_DIM)}
    return {
        f"{part}_{name}": torch.randn(shape, generator=generator).to(dtype)
        for part, shape in shapes.items()
        for name in "qkv"
    }


def run_attention(kind: str, inputs: dict, layout, text_mask: torch.Tensor | None) -> torch.Tensor:
    """The attention output (B, N, L_local, K) (joint: with the text output appended on the tokens)."""
    video = (inputs["video_q"], inputs["video_k"], inputs["video_v"])
    if kind == "self":
        return layout.self_attention(*video)
    text = (inputs["text_q"], inputs["text_k"], inputs["text_v"])
    out_video, out_text = layout.joint_attention(video, text, text_mask)
    return torch.cat([out_video, out_text], dim=2)


def reference_attention(kind: str, inputs: dict, text_mask: torch.Tensor | None) -> torch.Tensor:
    """Plain attention over the whole (unpadded) sequence, in float32 with the text mask."""
    upcast = {name: x.float() for name, x in inputs.items()}
    video = (upcast["video_q"], upcast["video_k"], upcast["video_v"])
    if kind == "self":
        return attention(*video)
    text = (upcast["text_q"], upcast["text_k"], upcast["text_v"])
    out_video, out_text = joint_attention(video, text, text_mask)
    return torch.cat([out_video, out_text], dim=2)


def compare_layout(kind: str, dtype: torch.dtype, text_mask: torch.Tensor | None, group) -> dict:
    """Sequence-parallel attention against `reference_attention`: outputs and input gradients."""
    layout = UlyssesLayout(group)
    inputs = {name: x.requires_grad_() for name, x in whole_inputs(dtype).items()}
    reference_inputs = {name: x.detach().clone().requires_grad_() for name, x in inputs.items()}
    local = {name: layout.split(x, dim=2) if name.startswith("video") else x for name, x in inputs.items()}
    with CountMaskedSDPA() as counter:
        out = run_attention(kind, local, layout, text_mask)  # (B, N, l [+ T], K)
    out_video = rearrange(out[:, :, : out.shape[2] - (TEXT if kind == "joint" else 0)], "b n l k -> b l n k")
    whole = [rearrange(layout.gather(out_video, LENGTH, dim=1), "b l n k -> b n l k")]
    if kind == "joint":
        whole.append(out[:, :, -TEXT:])
    ours = torch.cat(whole, dim=2)  # (B, N, L [+ T], K)
    reference = reference_attention(kind, reference_inputs, text_mask)
    weights = torch.randn(reference.shape, generator=torch.Generator().manual_seed(1))
    if text_mask is not None:  # padded text queries' outputs are not compared, nor trained
        weights[:, :, LENGTH:] *= text_mask[:, None, :, None]
    (ours.float() * weights).sum().backward()
    (reference * weights).sum().backward()
    report = {"output": gap(ours * (weights != 0), reference * (weights != 0))}
    for name, x in inputs.items():
        if kind == "self" and name.startswith("text"):
            continue
        grad = x.grad.float()
        dist.all_reduce(grad)  # each rank's share of the gradient of the (identical) loss
        report[name] = gap(grad / dist.get_world_size(), reference_inputs[name].grad)
    report["masked_calls"] = counter.masked
    return report


def fresh_model(variant: str) -> VideoDenoiser:
    cfg = ModelConfig(preset="test", hidden_size=32, depth=2, num_heads=2, patch_size=[2, 4, 4], text_dim=32,
                      text_depth=1, text_heads=2, text_vocab_size=256, **VARIANTS[variant])  # fmt: skip
    torch.manual_seed(0)
    model = build_denoiser(cfg)
    with torch.no_grad():
        for p in model.parameters():  # off adaLN-Zero's zero start, so every block matters
            p.add_(0.02 * torch.randn_like(p))
    return model


def compare_model(variant: str, dtype: torch.dtype, group) -> dict:
    """The denoiser split over the ranks against the whole one, on a 27-token grid."""
    whole = fresh_model(variant).to(dtype)
    split = copy.deepcopy(whole)
    apply_sequence_parallel(split, group)
    ids, mask = tokens()
    data = torch.Generator().manual_seed(2)
    x = torch.randn(BATCH, 3, 6, 12, 12, generator=data).to(dtype)  # 3 × 3 × 3 = 27 tokens
    t = torch.rand(BATCH, generator=data)
    outputs, gradients = [], []
    for model in (whole, split):
        with CountMaskedSDPA() as counter:  # the last one counts the split model's calls
            out = model(x, t, ids, mask)
            out.float().square().mean().backward()
        outputs.append(out.detach())
        gradients.append(torch.cat([p.grad.float().flatten() for p in model.parameters()]))
    dist.all_reduce(gradients[1])  # the mean over the ranks, as DeepSpeed takes it
    gradients[1] /= dist.get_world_size()
    return {"output": gap(outputs[1], outputs[0]), "grad": gap(gradients[1], gradients[0]),
            "masked_calls": counter.masked}  # fmt: skip


def tokens() -> tuple[torch.Tensor, torch.Tensor]:
    """The uniform captions' token ids and mask (B, 16), padded after 6 tokens."""
    cfg = ModelConfig(preset="test", text_vocab_size=256)
    return build_tokenizer(cfg)(CAPTIONS["uniform"])


def compare_backend_order(group) -> dict:
    """The layout's kernels whichever of the two is applied first."""
    first, second = fresh_model("cross_attention"), fresh_model("cross_attention")
    apply_attention_backend(first, "math", torch.device("cpu"))
    apply_sequence_parallel(first, group)
    apply_sequence_parallel(second, group)
    apply_attention_backend(second, "math", torch.device("cpu"))
    return {
        "backend_first": list(first.dit.layout.backends),
        "sequence_parallel_first": list(second.dit.layout.backends),
        "layouts": [type(first.dit.layout).__name__, type(second.dit.layout).__name__],
    }


def main(out: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    group = sequence_groups(2)
    ragged = build_tokenizer(ModelConfig(preset="test"))(CAPTIONS["ragged"])[1][:, :TEXT]  # (B, T)
    report: dict = {"layout": {}, "models": {}, "backends": compare_backend_order(group)}
    for dtype_name, dtype in DTYPES.items():
        for kind, text_mask in (("self", None), ("joint", None), ("joint ragged", ragged)):
            report["layout"][f"{kind} {dtype_name}"] = compare_layout(
                kind.split()[0], dtype, text_mask, group
            )
        for variant in VARIANTS:
            report["models"][f"{variant} {dtype_name}"] = compare_model(variant, dtype, group)
    if dist.get_rank() == 0:
        with open(out, "w") as file:
            json.dump(report, file, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
