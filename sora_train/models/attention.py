"""The one attention function every block calls, and how a sample's tokens are laid out.

Shape legend: B batch, N heads, L query tokens, S key tokens, K head dim, D channels.
Sequence parallelism hooks in through `TokenLayout`: the DiT splits its tokens with it, runs
self-attention through it and gathers its output with it. The default layout keeps the whole
sequence on this process; `sora_train.parallel.sequence` supplies the Ulysses one, so the
model code never changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Scaled dot-product attention.

    q: (B, N, L, K), k/v: (B, N, S, K), key_mask: (B, S) or (1, S) bool, True where a key may be
    attended. Returns (B, N, L, K). Every row of `key_mask` must keep at least one key.
    """
    attn_mask = None
    if key_mask is not None:
        attn_mask = key_mask[:, None, None, :]  # (B, 1, 1, S) broadcast over heads and queries
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


class TokenLayout:
    """The whole token sequence of every sample on this process (no sequence parallelism)."""

    degree = 1  # processes sharing one sample's tokens

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This process' share of `x` along the token dimension `dim` (here: all of it)."""
        return x

    def gather(self, x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
        """The whole sequence of `length` tokens back from every process' share (here: `x`)."""
        return x

    def padding_mask(self, length: int, device: torch.device) -> torch.Tensor | None:
        """(1, S) bool over the keys self-attention sees, False on padding; None without padding."""
        return None

    def self_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Attention of this process' queries (B, N, L, K) over the sample's keys and values."""
        return attention(q, k, v, key_mask)
