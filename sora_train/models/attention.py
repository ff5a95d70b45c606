"""The one attention function every block calls.

Shape legend: B batch, N heads, L query tokens, S key tokens, K head dim.
Sequence parallelism (Ulysses) hooks in here later: it wraps `attention` with
all-to-alls over the sequence-parallel group, so the blocks never change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Scaled dot-product attention.

    q: (B, N, L, K), k/v: (B, N, S, K), key_mask: (B, S) bool, True where a key may be attended.
    Returns (B, N, L, K). Every row of `key_mask` must keep at least one key.
    """
    attn_mask = None
    if key_mask is not None:
        attn_mask = key_mask[:, None, None, :]  # (B, 1, 1, S) broadcast over heads and queries
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
