"""Ulysses sequence parallelism: the ranks of a sequence-parallel group share each sample's tokens.

Every rank of a group gets the same samples (data is split by data-parallel rank only). The DiT
patchifies the whole video, keeps this rank's contiguous slice of the tokens (the sequence is
padded to a multiple of the degree; padded keys are masked out of self-attention), and runs its
blocks on that slice. Self-attention swaps the split: an all-to-all turns (all heads, my tokens)
into (my heads, all tokens), attention runs, and a second all-to-all swaps back. Everything else
in a block acts token by token. The output patches are gathered, so every rank computes the same
loss on the whole video.

Gradients: the gather's backward sums the gradient every rank's (identical) loss sends to this
rank's slice, so each rank's parameter gradients are the group size times its slice's share.
DeepSpeed averages gradients over all ranks (data-parallel × sequence-parallel), which turns
that into exactly the data-parallel mean of the full-sequence gradients.

Shape legend: B batch, N heads, L tokens (L_pad padded, l = L_pad / P per rank), K head dim, P degree.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from einops import rearrange

from ..models.attention import TokenLayout, attention
from ..models.denoiser import VideoDenoiser


def _exchange(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Send x[p] to rank p of `group` and receive rank p's x[me] into out[p] (x: (P, ...))."""
    x = x.contiguous()
    out = torch.empty_like(x)  # contiguous like x (empty_like keeps a permuted tensor's strides)
    dist.all_to_all_single(out, x, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """`_exchange` with autograd; the exchange is its own adjoint."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _exchange(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _exchange(grad, ctx.group), None


class _GatherTokens(torch.autograd.Function):
    """Every rank's (B, l, ...) slice concatenated along dim 1 and cut to `length`: (B, L, ...).

    Backward: this rank's slice of the sum of every rank's gradient (a reduce-scatter, done as
    an all-to-all and a sum, which gloo supports too).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, length: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        pieces = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(pieces, x, group=group)
        return torch.cat(pieces, dim=1)[:, :length]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        degree = dist.get_world_size(ctx.group)
        padded = _pad_tokens(grad, degree, dim=1)  # (B, L_pad, ...)
        per_rank = rearrange(padded, "b (p l) ... -> p b l ...", p=degree)
        return _exchange(per_rank, ctx.group).sum(0), None, None


def _pad_tokens(x: torch.Tensor, degree: int, dim: int) -> torch.Tensor:
    """`x` with zeros appended along `dim` up to a multiple of `degree`."""
    missing = -x.shape[dim] % degree
    if not missing:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


class UlyssesLayout(TokenLayout):
    """A sample's tokens split into `degree` contiguous slices over the ranks of `group`."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.degree = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        padded = _pad_tokens(x, self.degree, dim)
        return padded.chunk(self.degree, dim=dim)[self.rank]

    def gather(self, x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
        if dim != 1:
            raise ValueError(f"tokens are gathered along dim 1, not {dim}")
        return _GatherTokens.apply(x, length, self.group)

    def padding_mask(self, length: int, device: torch.device) -> torch.Tensor | None:
        padded = math.ceil(length / self.degree) * self.degree
        if padded == length:
            return None
        return (torch.arange(padded, device=device) < length)[None]  # (1, L_pad)

    def self_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None
    ) -> torch.Tensor:
        qkv = torch.stack((q, k, v))  # (3, B, N, l, K): all heads, this rank's tokens
        per_rank = rearrange(qkv, "three b (p n) l k -> p three b n l k", p=self.degree)
        exchanged = _AllToAll.apply(per_rank, self.group)  # [p]: rank p's tokens, this rank's heads
        q, k, v = rearrange(exchanged, "p three b n l k -> three b n (p l) k")  # (B, N/P, L_pad, K)
        out = attention(q, k, v, key_mask)  # (B, N/P, L_pad, K)
        per_rank = rearrange(out, "b n (p l) k -> p b n l k", p=self.degree)
        exchanged = _AllToAll.apply(per_rank, self.group)  # [p]: this rank's tokens, rank p's heads
        return rearrange(exchanged, "p b n l k -> b (p n) l k")  # (B, N, l, K)


def sequence_groups(degree: int) -> dist.ProcessGroup | None:
    """This rank's sequence-parallel group: `degree` consecutive ranks (None when degree is 1).

    Collective: every rank creates every group, in the same order. Consecutive ranks keep a
    group's all-to-alls within a node when the degree divides the processes per node.
    """
    if degree == 1:
        return None
    world, rank = dist.get_world_size(), dist.get_rank()
    mine = None
    for first in range(0, world, degree):
        group = dist.new_group(list(range(first, first + degree)))
        if first <= rank < first + degree:
            mine = group
    return mine


def apply_sequence_parallel(model: VideoDenoiser, group: dist.ProcessGroup | None) -> None:
    """Make `model`'s DiT compute its share of each sample's tokens over `group` (no-op for None)."""
    if group is not None:
        model.dit.layout = UlyssesLayout(group)
