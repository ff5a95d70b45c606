"""Ulysses sequence parallelism: the ranks of a sequence-parallel group share each sample's tokens.

Every rank of a group gets the same samples (data is split by data-parallel rank only). The DiT
patchifies the whole video, keeps this rank's contiguous slice of the tokens (the sequence is
padded to a multiple of the degree), and runs its blocks on that slice. Self-attention swaps the
split: an all-to-all turns (all heads, my tokens) into (my heads, all tokens), attention runs, and a
second all-to-all swaps back. After the first exchange every rank holds all L_pad tokens of its
heads, so the padded keys and values are sliced off (no mask, which would rule out the flash and
cuDNN kernels); the padded queries still get an output (attention over the true keys), which the
final gather cuts. Everything else in a block acts token by token. The output patches are
gathered, so every rank computes the same loss on the whole video.

MM-DiT's joint attention does the same for the video tokens. The text tokens are few and every
rank keeps all of them (the text stream is computed on every rank): each rank takes its heads'
slice of the text queries, keys and values, attends with its heads over [text, all video] keys,
and the text outputs of all heads are gathered back.

Gradients: every collective's backward is its true adjoint (the gathers' is a reduce-scatter), so
the gradients the ranks of a group compute sum to the gradient of the sum of their (identical)
losses: the group size times the full-sequence gradient. DeepSpeed averages gradients over all
ranks (data-parallel × sequence-parallel), which turns that into exactly the data-parallel mean of
the full-sequence gradients.

Shape legend: B batch, N heads (n = N / P per rank), L tokens (L_pad padded, l = L_pad / P per
rank), T text tokens, K head dim, P degree.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.distributed as dist
from einops import rearrange

from ..models.attention import QKV, Backends, TokenLayout, attention, joint_attention
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


class _Gather(torch.autograd.Function):
    """Every rank's piece concatenated along `dim` and cut to `length` (e.g. (B, l, ...) token
    slices -> (B, L, ...), or (B, n, T, K) heads -> (B, N, T, K)).

    Backward: this rank's piece of the sum of every rank's gradient (a reduce-scatter, done as
    an all-to-all and a sum, which gloo supports too).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, length: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group, ctx.dim = group, dim
        x = x.contiguous()
        pieces = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(pieces, x, group=group)
        return torch.cat(pieces, dim=dim).narrow(dim, 0, length)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        degree = dist.get_world_size(ctx.group)
        padded = _pad_tokens(grad, degree, dim=ctx.dim)
        per_rank = torch.stack(padded.chunk(degree, dim=ctx.dim))  # (P, ...): rank p's piece
        return _exchange(per_rank, ctx.group).sum(0), None, None, None


def _pad_tokens(x: torch.Tensor, degree: int, dim: int) -> torch.Tensor:
    """`x` with zeros appended along `dim` up to a multiple of `degree`."""
    missing = -x.shape[dim] % degree
    if not missing:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


class UlyssesLayout(TokenLayout):
    """A sample's tokens split into `degree` contiguous slices over the ranks of `group`.

    `length` is the true token count of the sequence last split (None before any split: taken as
    unpadded); attention slices the keys of the padded sequence to it. A forward splits its tokens
    before any block runs, and the recompute of a checkpointed block during backward reads the same
    value (a forward of another sequence in between changes the keys' shapes, which `_true_length`
    or torch's check of the recomputed tensors reports).
    """

    def __init__(self, group: dist.ProcessGroup, backends: Backends | None = None):
        super().__init__(backends)
        self.group = group
        self.degree = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.length: int | None = None

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        self.length = x.shape[dim]
        padded = _pad_tokens(x, self.degree, dim)
        return padded.chunk(self.degree, dim=dim)[self.rank]

    def gather(self, x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
        if dim != 1:
            raise ValueError(f"tokens are gathered along dim 1, not {dim}")
        return _Gather.apply(x, 1, length, self.group)

    def _true_length(self, padded: int) -> int:
        """The true token count of a padded sequence of `padded` tokens (the last split's)."""
        if self.length is None:
            return padded
        if math.ceil(self.length / self.degree) * self.degree != padded:
            raise RuntimeError(
                f"attention over {padded} padded tokens, but the last split sequence had {self.length} "
                f"tokens (padded to a multiple of {self.degree}): split a sequence before attending to it"
            )
        return self.length

    def _drop_padding(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, n, L_pad, K) -> (B, n, L, K) without the padded tokens."""
        length = self._true_length(k.shape[2])
        return k[:, :, :length], v[:, :, :length]

    def _heads_to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(..., B, N, l, K) all heads, this rank's tokens -> (..., B, n, L_pad, K) this rank's heads,
        all tokens."""
        per_rank = rearrange(x, "... b (p n) l k -> p ... b n l k", p=self.degree)
        exchanged = _AllToAll.apply(per_rank, self.group)  # [p]: rank p's tokens, this rank's heads
        return rearrange(exchanged, "p ... b n l k -> ... b n (p l) k")

    def _tokens_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n, L_pad, K) this rank's heads, all tokens -> (B, N, l, K) all heads, this rank's tokens."""
        per_rank = rearrange(x, "b n (p l) k -> p b n l k", p=self.degree)
        exchanged = _AllToAll.apply(per_rank, self.group)  # [p]: this rank's tokens, rank p's heads
        return rearrange(exchanged, "p b n l k -> b (p n) l k")

    def _my_heads(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """(B, N, T, K) -> (B, n, T, K): this rank's heads of a tensor every rank holds whole."""
        if x is None:
            return None
        return rearrange(x, "b (p n) t k -> p b n t k", p=self.degree)[self.rank]

    def self_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads_to_tokens(torch.stack((q, k, v)))  # three (B, n, L_pad, K)
        k, v = self._drop_padding(k, v)  # (B, n, L, K)
        out = attention(q, k, v, None, self.backends)  # (B, n, L_pad, K)
        return self._tokens_to_heads(out)  # (B, N, l, K)

    def joint_attention(
        self, video: QKV, text: QKV, text_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        q_video, k_video, v_video = self._heads_to_tokens(torch.stack(video))  # three (B, n, L_pad, K)
        k_video, v_video = self._drop_padding(k_video, v_video)  # (B, n, L, K)
        text = tuple(self._my_heads(x) for x in text)  # (B, n, T, K) each, or None
        out_video, out_text = joint_attention(
            (q_video, k_video, v_video), text, text_mask, self.backends
        )  # (B, n, L_pad, K), (B, n, T, K) or None
        if out_text is not None:  # (B, n, T, K) -> (B, N, T, K): every head's text output
            out_text = _Gather.apply(out_text, 1, out_text.shape[1] * self.degree, self.group)
        return self._tokens_to_heads(out_video), out_text


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
    """Make `model`'s DiT compute its share of each sample's tokens over `group` (no-op for None);
    the attention kernels chosen for its layout (`parallel/attention_backend.py`) carry over."""
    if group is not None:
        model.dit.layout = UlyssesLayout(group, model.dit.layout.backends)


class GroupBatchesDiffer(RuntimeError):
    """The ranks of a sequence-parallel group loaded different batches (the run stops; a rerun resumes)."""


def check_group_batch(keys: list[str], group: dist.ProcessGroup | None, device: torch.device) -> None:
    """Stop when the ranks of the sequence-parallel `group` do not all hold the batch `keys` names
    (collective within the group; nothing without one).

    Every rank of a group loads the group's batches itself; a skip that depends on timing (a decode
    that timed out or crashed on one rank only) would hand them different samples, whose tokens the
    all-to-alls would then mix, or whose different sizes would hang them. A fingerprint of the keys
    is compared at every micro-batch, so that never trains. Raises GroupBatchesDiffer.
    """
    if group is None:
        return
    mine = torch.tensor([zlib.crc32("\x00".join(keys).encode()), len(keys)], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    differing = [rank for rank, theirs in enumerate(every) if not torch.equal(theirs, mine)]
    if differing:
        raise GroupBatchesDiffer(
            f"the sequence-parallel ranks {differing} of this rank's group loaded another batch than its "
            f"{len(keys)} samples (first {keys[0] if keys else None!r}): a sample was skipped on some of "
            "them only (a decode timeout or crash); rerun to resume from the last checkpoint"
        )
