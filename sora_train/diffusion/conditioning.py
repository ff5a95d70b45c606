"""Frame conditioning: which latent frames of a clip are given clean rather than denoised.

Image-to-video keeps the first latent frame clean, extension the first few, interpolation the
first and the last. Training draws a strategy per sample (`draw_frame_mask`); sampling derives
the mask from the pixel frames a user gives (`cover_given_frames`). Either way the masked frames
of x_t are the clean frames (`hold_frames`) and the model sees the mask as an input channel.

Pixel frames to latent frames: a causal video VAE (Wan) encodes pixel frame 0 alone into latent
frame 0, and latent frame i > 0 from the `temporal` pixel frames 1 + temporal·(i - 1) ... temporal·i.
Pixel space is the case temporal = 1. Given frames condition only the latent frames they cover
whole: the first P pixel frames of a clip cover 1 + (P - 1) // temporal latent frames, the last
Q < F cover Q // temporal.

Shape legend: B batch, C channels, f latent frames, h/w latent height/width, F pixel frames.
"""

from __future__ import annotations

from itertools import accumulate
from typing import TYPE_CHECKING, Literal, NamedTuple, get_args

import torch
from einops import rearrange

if TYPE_CHECKING:
    from ..config import DiffusionConfig

# The keys of `diffusion.conditioning`: which latent frames a training sample keeps clean.
ConditioningStrategy = Literal["none", "first", "first_k", "last", "first_last", "random"]
CONDITIONING_STRATEGIES: tuple[ConditioningStrategy, ...] = get_args(ConditioningStrategy)


def draw_strategies(
    batch: int, probabilities: dict[str, float], generator: torch.Generator
) -> list[ConditioningStrategy]:
    """One strategy per sample with the given probabilities, from one `torch.rand(B)` draw.

    Strategies are laid out in `CONDITIONING_STRATEGIES` order (not the dict's), so the same
    generator state and probabilities always give the same strategies.
    """
    names = [name for name in CONDITIONING_STRATEGIES if probabilities.get(name, 0.0) > 0]
    edges = torch.tensor(list(accumulate(probabilities[name] for name in names)), dtype=torch.float64)
    u = torch.rand(batch, generator=generator).double()
    index = torch.searchsorted(edges, u, right=True).clamp(max=len(names) - 1)  # (B,)
    return [names[i] for i in index.tolist()]


def strategy_mask(
    strategy: ConditioningStrategy, frames: int, first_k: int, rate: float, uniform: torch.Tensor
) -> torch.Tensor:
    """(f,) bool: the latent frames `strategy` keeps clean in a clip of `frames` latent frames.

    At least one frame always stays noisy: a single frame (an image) is never conditioned,
    first_k keeps at most f - 1 frames, first_last on two frames keeps only the first, and
    random (each frame with probability `rate`, decided by `uniform` (f,) in [0, 1)) frees the
    frame with the largest draw when it would keep them all.
    """
    mask = torch.zeros(frames, dtype=torch.bool)
    if frames == 1 or strategy == "none":
        return mask
    if strategy == "first":
        mask[0] = True
    elif strategy == "first_k":
        mask[: min(first_k, frames - 1)] = True
    elif strategy == "last":
        mask[-1] = True
    elif strategy == "first_last":
        mask[0] = True
        mask[-1] = frames > 2
    elif strategy == "random":
        mask = uniform < rate
        if mask.all():
            mask[uniform.argmax()] = False
    else:
        raise ValueError(
            f"unknown conditioning strategy {strategy!r}; use {', '.join(CONDITIONING_STRATEGIES)}"
        )
    return mask


def draw_frame_mask(
    batch: int, frames: int, diffusion: DiffusionConfig, generator: torch.Generator
) -> torch.Tensor:
    """(B, f) bool on the CPU: True on the latent frames kept clean, by a strategy drawn per sample.

    Draws `torch.rand(B)` (the strategies) then `torch.rand(B, f)` (for `random`) from `generator`,
    whatever was drawn, so the generator advances the same way for every batch of this shape.
    """
    strategies = draw_strategies(batch, diffusion.conditioning, generator)
    uniform = torch.rand(batch, frames, generator=generator)  # (B, f)
    return torch.stack([
        strategy_mask(
            strategy, frames, diffusion.conditioning_first_k, diffusion.conditioning_random_rate, row
        )
        for strategy, row in zip(strategies, uniform, strict=True)
    ])  # fmt: skip


def hold_frames(x: torch.Tensor, clean: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """x (B, C, f, h, w) with the frames `frame_mask` (B, f) marks replaced by `clean`'s, bit for bit."""
    keep = rearrange(frame_mask, "b f -> b 1 f 1 1")
    return torch.where(keep, clean, x)


def start_cover(given: int, temporal: int) -> int:
    """Latent frames wholly inside a clip's first `given` pixel frames (0 when none are given)."""
    return 0 if given == 0 else 1 + (given - 1) // temporal


class FrameCover(NamedTuple):
    """The latent frames given pixel frames cover whole: `head` at a clip's start, `tail` at its end,
    of the clip's `latent` frames, with `temporal` pixel frames per latent frame after the first."""

    head: int
    tail: int
    latent: int
    temporal: int

    @property
    def head_pixels(self) -> int:
        """Pixel frames the head latent frames hold: the first 1 + temporal·(head - 1)."""
        return 0 if self.head == 0 else 1 + self.temporal * (self.head - 1)

    @property
    def tail_pixels(self) -> int:
        """Pixel frames the tail latent frames hold: the last temporal·tail."""
        return self.temporal * self.tail

    def mask(self) -> torch.Tensor:
        """(f,) bool: True on the covered latent frames."""
        mask = torch.zeros(self.latent, dtype=torch.bool)
        mask[: self.head] = True
        mask[self.latent - self.tail :] = True
        return mask


def cover_given_frames(first: int, last: int, frames: int, temporal: int) -> FrameCover:
    """What `first` given pixel frames at the start and `last` at the end of a clip of `frames`
    pixel frames cover whole.

    Raises ValueError (one line) when no frames are given, the last frames cover no whole latent
    frame, or the two parts together cover every latent frame (nothing would be generated).
    """
    latent = start_cover(frames, temporal)
    head = start_cover(first, temporal)
    tail = latent if last >= frames else last // temporal
    if not head and not tail:
        raise ValueError("no frames given to condition on")
    if last and not tail:
        raise ValueError(
            f"{last} last frame(s) cover no whole latent frame: each latent frame after the first "
            f"holds {temporal} pixel frames"
        )
    if head + tail >= latent:
        raise ValueError(
            f"the given frames ({first} first, {last} last) cover all {latent} latent frames of a "
            f"{frames}-frame clip; leave some to generate"
        )
    return FrameCover(head, tail, latent, temporal)
