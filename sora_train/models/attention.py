"""The one attention function every block calls, and how a sample's tokens are laid out.

Shape legend: B batch, N heads, L query tokens, S key tokens, K head dim, D channels.
Sequence parallelism hooks in through `TokenLayout`: the DiT splits its tokens with it, runs
self-attention (or MM-DiT's joint text-video attention) through it and gathers its output with
it. The default layout keeps the whole sequence on this process; `sora_train.parallel.sequence`
supplies the Ulysses one, so the model code never changes.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

# `train.attention_backend`: the SDPA kernel every attention call runs (forward and recompute);
# auto: the fastest one eligible on the device.
AttentionBackend = Literal["auto", "cudnn", "flash", "efficient", "math"]


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


QKV = tuple[
    torch.Tensor | None, torch.Tensor, torch.Tensor
]  # queries (None: keys and values only), keys, values


def joint_attention(
    video: QKV, text: QKV, text_mask: torch.Tensor, key_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of video and text queries over the concatenated [text, video] keys (MM-DiT).

    video: (B, N, S, K) each; text: (B, N, T, K) each, its queries None when no text output is
    needed; text_mask (B, T) bool; key_mask (1, S) or None as for self-attention. Returns the
    video output (B, N, S, K) and the text output (B, N, T, K) or None.
    """
    q_video, k_video, v_video = video
    q_text, k_text, v_text = text
    queries = q_video if q_text is None else torch.cat([q_text, q_video], dim=2)
    keys, values = torch.cat([k_text, k_video], dim=2), torch.cat([v_text, v_video], dim=2)
    video_keys = key_mask if key_mask is not None else text_mask.new_ones(1, k_video.shape[2])
    mask = torch.cat([text_mask, video_keys.expand(text_mask.shape[0], -1)], dim=1)  # (B, T + S)
    out = attention(queries, keys, values, mask)
    if q_text is None:
        return out, None
    text_length = q_text.shape[2]
    return out[:, :, text_length:], out[:, :, :text_length]


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

    def joint_attention(
        self, video: QKV, text: QKV, text_mask: torch.Tensor, key_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`joint_attention` for this process' video tokens (B, N, L, K) and the whole caption's
        text tokens (B, N, T, K); returns this process' video output and the whole text output."""
        return joint_attention(video, text, text_mask, key_mask)
