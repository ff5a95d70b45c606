"""The one attention function every block calls, and how a sample's tokens are laid out.

Shape legend: B batch, N heads, L query tokens, S key tokens, T text tokens, K head dim, D channels,
E text width.
Sequence parallelism hooks in through `TokenLayout`: the DiT splits its tokens with it, runs
self-attention (or MM-DiT's joint text-video attention, or cross-attention to the text) through it
and gathers its output with it. The default layout keeps the whole sequence on this process;
`sora_train.parallel.sequence` supplies the Ulysses one, so the model code never changes.

The layout also carries the SDPA kernels (`backends`, in priority order) every attention call runs
under. The choice is applied around each SDPA call itself, so it holds wherever that call runs:
in the forward, in the recompute of a checkpointed block during backward (which runs outside any
context the training loop entered), and inside a compiled block (Dynamo traces `sdpa_kernel`).

Masks rule out the flash and cuDNN kernels, so none is built where it can be avoided: captions are
cut after the last token any of them keeps and their mask dropped when every caption keeps all the
rest (`drop_caption_padding`, once per forward in `VideoDenoiser`); Ulysses slices its padded keys
off. Captions of different lengths in one batch still need their mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# `train.attention_backend`: the SDPA kernel every attention call runs (forward and recompute);
# auto: the fastest one eligible on the device.
AttentionBackend = Literal["auto", "cudnn", "flash", "efficient", "math"]
NAMED_BACKENDS: dict[str, SDPBackend] = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}  # every `AttentionBackend` but auto: the torch kernel it names
_NO_KERNEL = ("No available kernel", "No viable backend")  # torch's errors when no enabled kernel fits

# SDPA kernels by their `NAMED_BACKENDS` names, in priority order; None where taken: torch's default.
# Names rather than torch's enum, so a model holding them still pickles.
Backends = Sequence[str]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    backends: Backends | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention.

    q: (B, N, L, K), k/v: (B, N, S, K), key_mask: (B, S) or (1, S) bool, True where a key may be
    attended. Returns (B, N, L, K). Every row of `key_mask` must keep at least one key. `backends`:
    the SDPA kernels allowed (`NAMED_BACKENDS` names), the first eligible one runs (None: torch's
    default choice).
    """
    attn_mask = None
    if key_mask is not None:
        attn_mask = key_mask[:, None, None, :]  # (B, 1, 1, S) broadcast over heads and queries
    if backends is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    kernels = [NAMED_BACKENDS[name] for name in backends]
    if torch.compiler.is_compiling():  # traced: an ineligible kernel fails while compiling
        with sdpa_kernel(kernels, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    try:
        with sdpa_kernel(kernels, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    except RuntimeError as error:
        if not any(reason in str(error) for reason in _NO_KERNEL):
            raise
        raise RuntimeError(_no_kernel_message(q, k, attn_mask, backends)) from error


def _no_kernel_message(
    q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None, backends: Backends
) -> str:
    """Why an attention call found no kernel, naming the option that chose the kernels."""
    names = ", ".join(f"{name} ({NAMED_BACKENDS[name].name})" for name in backends)
    masked = "with a key mask" if attn_mask is not None else "without a mask"
    return (
        f"train.attention_backend allows only the SDPA kernel(s) {names}, and none can run attention "
        f"of {q.dtype} queries {tuple(q.shape)} over keys {tuple(k.shape)} {masked} on {q.device} "
        "(torch's warnings above say why). Choose another train.attention_backend, or auto for the "
        "fastest eligible one; masks rule out flash and cudnn (captions of different lengths in one "
        "micro batch need a mask)."
    )


QKV = tuple[
    torch.Tensor | None, torch.Tensor, torch.Tensor
]  # queries (None: keys and values only), keys, values


def joint_attention(
    video: QKV,
    text: QKV,
    text_mask: torch.Tensor | None,
    backends: Backends | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of video and text queries over the concatenated [text, video] keys (MM-DiT).

    video: (B, N, S, K) each; text: (B, N, T, K) each, its queries None when no text output is
    needed; text_mask (B, T) bool, or None when every text key may be attended (then the attention
    runs unmasked). Every video key is attended. Returns the video output (B, N, S, K) and the text
    output (B, N, T, K) or None.
    """
    q_video, k_video, v_video = video
    q_text, k_text, v_text = text
    queries = q_video if q_text is None else torch.cat([q_text, q_video], dim=2)
    keys, values = torch.cat([k_text, k_video], dim=2), torch.cat([v_text, v_video], dim=2)
    mask = None
    if text_mask is not None:
        video_keys = text_mask.new_ones(text_mask.shape[0], k_video.shape[2])
        mask = torch.cat([text_mask, video_keys], dim=1)  # (B, T + S)
    out = attention(queries, keys, values, mask, backends)
    if q_text is None:
        return out, None
    text_length = q_text.shape[2]
    return out[:, :, text_length:], out[:, :, :text_length]


def drop_caption_padding(
    text: torch.Tensor, text_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The captions without the padding none of them needs, and whether any still needs a mask.

    text (B, T, ...) token ids or embeddings, text_mask (B, T) bool -> text (B, T', ...), mask
    (B, T') and whether every caption keeps all T' tokens (then attention to the text needs no
    mask). T' ends at the last token any caption keeps: the columns after it are padding in every
    row, wherever the padding sits. Exact for every kept token, since no query attends to a padded
    key either way. One device-to-host copy: call it once per forward, not per block.
    """
    positions = torch.arange(1, text_mask.shape[1] + 1, device=text_mask.device)  # (T,)
    last_kept = (text_mask * positions).amax(dim=1)  # (B,) one past each caption's last kept token
    kept = text_mask.sum(dim=1)  # (B,)
    longest, fewest_kept = torch.stack([last_kept.max(), kept.min()]).tolist()
    length = max(longest, 1)
    return text[:, :length], text_mask[:, :length], fewest_kept == length


class TokenLayout:
    """The whole token sequence of every sample on this process (no sequence parallelism).

    `backends`: the SDPA kernels (`NAMED_BACKENDS` names), in priority order, that every attention
    call through this layout runs under (None: torch's default choice); set by
    `sora_train.parallel.attention_backend`.
    """

    degree = 1  # processes sharing one sample's tokens

    def __init__(self, backends: Backends | None = None):
        self.backends = None if backends is None else tuple(backends)

    def split(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This process' share of `x` along the token dimension `dim` (here: all of it)."""
        return x

    def gather(self, x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
        """The whole sequence of `length` tokens back from every process' share (here: `x`)."""
        return x

    def self_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of this process' queries (B, N, L, K) over the sample's keys and values (a
        layout that pads the sequence drops the padded keys itself)."""
        return attention(q, k, v, None, self.backends)

    def cross_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention of this process' queries (B, N, L, K) over keys and values every process holds
        whole (B, N, S, K), e.g. the caption's: no exchange under any layout."""
        return attention(q, k, v, key_mask, self.backends)

    def joint_attention(
        self, video: QKV, text: QKV, text_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`joint_attention` for this process' video tokens (B, N, L, K) and the whole caption's
        text tokens (B, N, T, K); returns this process' video output and the whole text output."""
        return joint_attention(video, text, text_mask, self.backends)
