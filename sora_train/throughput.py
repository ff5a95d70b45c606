"""What a run reports about its speed: the start-up banner and each step's throughput figures.

MFU follows the design guide: Σ F_i over the step's samples (`flops.sample_flops`, forward and
backward, recompute not counted) over step time × devices × the device's dense bf16 peak. On a
CPU or a GPU type `hardware` does not know there is no peak, so the step reports achieved FLOP/s
per device and no MFU.
"""

from __future__ import annotations

import math
import resource
from dataclasses import dataclass

import torch

from .config import TrainConfig, data_parallel_size
from .flops import sample_flops
from .models.attention import drop_caption_padding
from .models.patch import grid_size
from .models.vae import LatentSpace
from .parallel.dist import DistInfo


def batch_tokens(shape: torch.Size, latent_space: LatentSpace | None, patch: tuple[int, int, int]) -> int:
    """Transformer tokens in a batch of (B, C, F, H, W) pixels, or of latents when `latent_space` is None."""
    grid = shape[2:] if latent_space is None else latent_space.latent_shape(*shape[2:])[1:]
    return shape[0] * math.prod(grid_size(tuple(grid), patch))


def attended_text_tokens(text_mask: torch.Tensor, variant: str) -> int:
    """T: text tokens per sample the DiT attends to for a micro-batch's (B, T) caption mask: Wan's
    whole padded captions; the other variants' captions up to the last token any of them keeps
    (`models/attention.drop_caption_padding`)."""
    if variant == "wan":
        return int(text_mask.shape[1])
    return int(drop_caption_padding(text_mask, text_mask)[1].shape[1])


def batch_flops(cfg: TrainConfig, video_tokens: int, batch_size: int, text_tokens: int) -> float:
    """Training FLOPs of one micro-batch of `batch_size` samples holding `video_tokens` in all."""
    per_token_t = cfg.diffusion.conditions_frames()  # Wan embeds a timestep per token under a frame mask
    return batch_size * sample_flops(
        cfg.model, video_tokens // batch_size, text_tokens, timesteps_per_token=per_token_t
    )


def peak_memory_bytes(device: torch.device) -> int:
    """The most memory this process has held: allocated CUDA memory on a GPU, resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_resident_bytes()


def peak_resident_bytes() -> int:
    """This process' peak resident set: VmHWM on Linux, else ru_maxrss.

    Linux's ru_maxrss also keeps the peak of the process that started this one (it survives the
    exec), so a small process started by a big one reports the big one's peak; VmHWM starts afresh.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@dataclass(frozen=True)
class StepThroughput:
    """One optimizer step's figures, summed over the data-parallel ranks."""

    tokens: int
    flops: float
    seconds: float
    devices: int
    peak_flops: float | None  # per device; None where unknown

    def row(self) -> dict[str, float]:
        """The metrics.jsonl fields: tokens/s per device, achieved TFLOP/s per device, MFU (with a peak)."""
        per_device = self.flops / (self.seconds * self.devices)
        row = {
            "tokens_per_s_per_device": self.tokens / self.seconds / self.devices,
            "tflops_per_device": per_device / 1e12,
        }
        if self.peak_flops:
            row["mfu"] = per_device / self.peak_flops
        return row


def layout_summary(
    cfg: TrainConfig, dist_info: DistInfo, parameters: int, tokens_by_bucket: dict[str, int]
) -> dict:
    """The run's shape, for the banner and the `layout` event."""
    nodes = max(1, dist_info.world_size // dist_info.local_world_size)
    return {
        "nodes": nodes,
        "devices_per_node": dist_info.local_world_size,
        "device": dist_info.device.type,
        "data_parallel": data_parallel_size(cfg, dist_info.world_size),
        "sequence_parallel": cfg.parallel.sequence_parallel,
        "zero_stage": cfg.parallel.zero_stage,
        "parameters": parameters,
        "global_batch": cfg.train.global_batch_size,
        "tokens_per_step_by_bucket": tokens_by_bucket,
    }


def banner_lines(summary: dict) -> list[str]:
    """The start-up banner: world layout, ZeRO stage, parameters, global batch, tokens per step."""
    tokens = summary["tokens_per_step_by_bucket"]
    spread = (
        f"{min(tokens.values()):,}"
        if len(set(tokens.values())) == 1
        else (f"{min(tokens.values()):,} to {max(tokens.values()):,} (by bucket)")
    )
    return [
        f"world: {summary['nodes']} node(s) × {summary['devices_per_node']} {summary['device']} device(s) = "
        f"data-parallel {summary['data_parallel']} × sequence-parallel {summary['sequence_parallel']}, "
        f"ZeRO stage {summary['zero_stage']}",
        f"model: {summary['parameters']:,} parameters; global batch {summary['global_batch']} samples, "
        f"{spread} tokens per step",
    ]
