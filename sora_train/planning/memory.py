"""The memory model: what training state and activations take per GPU.

The model (docs/planner.md has the derivation and the measured errors):

- States (AdamW under DeepSpeed ZeRO, sharded over every rank): a working copy of the
  parameters and gradients in the training dtype, an fp32 master copy and two fp32 moments
  (DeepSpeed keeps the fp32 master even when training in fp32), the fp32 EMA of the master weights
  (`sora_train/ema.py`: sharded as the optimizer shards the master; on the host with the optimizer
  below ZeRO-3 when it is offloaded), DeepSpeed's
  gradient-reduction buckets during backward, and the fp32 gradient partition at the optimizer step.
  Under LoRA gradients, optimizer states and EMA exist for the adapters only; the frozen base has
  its working copy in the training dtype (sharded under ZeRO-3).
- Activations: the bytes kept for backward, summed from a per-op table of what each kind of
  block saves (`block_terms`: the cross-attention DiT's block, MM-DiT's double-stream and
  single-stream blocks, Wan's block, and Wan's under LoRA on the default targets), each tensor
  tagged with its role under activation checkpointing, and
  checked against measurements on CPU (`measure_activation_bytes`). CUDA saves less than the CPU
  for RMSNorm (a fused kernel) and attention outputs (written token-major): plans for GPUs use
  `CUDA_KERNELS`, measurements on CPU `CPU_KERNELS`. A checkpointed block keeps its inputs
  (`full`, and blocks 0, k, 2k, ... under `every_k`) or its inputs and its matmul and attention
  outputs (`selective`); while the block with the most to recompute runs again in backward, its
  other tensors live again. Gradients in flight during one block's backward are an estimate
  (`transient`).
- Memory a GPU offers: its total less `RESERVE_BYTES` (CUDA context, NCCL and cuBLAS
  workspaces) and `FRAGMENTATION` of the rest (the caching allocator).

Shape legend: B batch per GPU, S video tokens per sample, s = ceil(S / SP) per GPU, T text
tokens, I image tokens, D hidden size, N heads, K head dim, M MLP width, E text width, R LoRA
rank, e bytes per activation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import astuple, dataclass
from typing import NamedTuple

from ..config import ConfigError, ModelConfig, ParallelConfig
from ..data.buckets import Bucket
from ..flops import (
    ParameterCounts,
    frozen_text_width,
    image_tokens,
    planned_latent_channels,
    planned_latent_compression,
)
from ..models.lora import DEFAULT_TARGETS
from ..models.patch import grid_size
from ..parallel.checkpointing import checkpointed_blocks
from ..parallel.zero import zero3_fetch_sizes

GIB = 2**30
RESERVE_BYTES = 2 * GIB  # CUDA context, NCCL buffers, cuBLAS workspaces: outside PyTorch's allocator
FRAGMENTATION = 0.05  # of the rest, lost to the caching allocator between differently shaped buckets
ADAM_BYTES = 12  # per parameter: fp32 master copy + two fp32 moments
EMA_BYTES = 4  # per parameter: fp32, sharded like the optimizer's fp32 master
TIME_FREQ_DIM = 256  # TimestepEmbedder's sinusoidal features


@dataclass(frozen=True)
class Kernels:
    """What the kernels of one device type save for backward, where devices differ."""

    fused_rms_norm: bool  # CUDA's fused RMSNorm saves its input and rstd; CPU's composite saves fp32 copies
    norm_stats_bytes: int | None  # LayerNorm mean/rstd element size; None: the activation dtype's
    # True: attention writes its output token-major (B, L, N, K), so the output projection's input
    # is a view of it (CUDA flash / memory-efficient kernels). False: the output follows the query's
    # layout (CPU), a copy unless the query is itself a view of a (B, L, D) projection.
    token_major_attention_output: bool


CPU_KERNELS = Kernels(fused_rms_norm=False, norm_stats_bytes=None, token_major_attention_output=False)
CUDA_KERNELS = Kernels(fused_rms_norm=True, norm_stats_bytes=4, token_major_attention_output=True)


# ---------------------------------------------------------------------------------------------
# Tokens


def latent_grid(bucket: Bucket, model: ModelConfig) -> tuple[int, int, int]:
    """(f, h, w) latent frames/height/width of a bucket's clips (Wan: `flops.WAN_COMPRESSION`)."""
    temporal, spatial, _ = planned_latent_compression(model)
    if temporal > 1 and (bucket.frames - 1) % temporal:
        raise ConfigError(f"bucket {bucket.name}: a Wan latent space needs 1 + {temporal}k frames")
    if bucket.height % spatial or bucket.width % spatial:
        raise ConfigError(f"bucket {bucket.name}: height and width must be multiples of {spatial}")
    frames = 1 + (bucket.frames - 1) // temporal if temporal > 1 else bucket.frames
    return frames, bucket.height // spatial, bucket.width // spatial


def video_tokens(bucket: Bucket, model: ModelConfig) -> int:
    """S: tokens of one sample of `bucket`, its latent grid cut into patches."""
    try:
        return math.prod(grid_size(latent_grid(bucket, model), tuple(model.patch_size)))
    except ValueError as error:
        raise ConfigError(f"bucket {bucket.name}: {error}") from error


def tokens_per_rank(tokens: int, sequence_parallel: int) -> int:
    """s: one sample's tokens on each rank of a sequence-parallel group (padded to a multiple of SP)."""
    return math.ceil(tokens / sequence_parallel)


# ---------------------------------------------------------------------------------------------
# Activations

# The role of a saved tensor under activation checkpointing (`block_terms`). INPUT: the block's own
# input, all that a checkpointed block keeps. KEPT: a matmul or attention output, which selective
# checkpointing keeps too. RECOMPUTED: saved for a pointwise op, recomputed under selective
# checkpointing. KEPT_ONLY: a matmul output only selective checkpointing keeps (nothing saves it
# for backward, e.g. it goes straight into a residual add).
# INPUT_ONLY: the block's input that nothing inside it saves (Wan's blocks save an fp32 copy of
# it instead), kept only by a checkpointed block.
INPUT, KEPT, RECOMPUTED, KEPT_ONLY, INPUT_ONLY = "input", "kept", "recomputed", "kept only", "input only"

# Kinds of block (`block_kinds`): the cross-attention DiT's; MM-DiT's double-stream block, the last
# one when no single-stream block follows (its text stream gives keys and values only), its
# single-stream block, and the last one (nothing reads its text output, so autograd frees that part).
CROSS_ATTENTION, DOUBLE, DOUBLE_KEYS_ONLY, SINGLE, SINGLE_LAST = (
    "cross-attention", "double-stream", "double-stream, keys-only text", "single-stream", "single-stream, last",
)  # fmt: skip
# Wan's block (models/wan.py), and under LoRA with the default targets: the first block (whose input
# needs no gradient) and the others.
WAN, WAN_LORA_FIRST, WAN_LORA = "wan", "wan, LoRA, first", "wan, LoRA"


@dataclass(frozen=True)
class Saved:
    """Bytes saved for backward by what they scale with: per video token on this rank, per text
    token and per sample (each for every sample of the batch), per video token on this rank shared
    by the batch (RoPE cos/sin), per image token (Wan image-to-video) and a fixed amount (fp32
    copies of a block's bf16 norm weights)."""

    token: int = 0
    text: int = 0
    sample: int = 0
    position: int = 0
    image: int = 0
    fixed: int = 0

    def __add__(self, other: Saved) -> Saved:
        return Saved(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    def __sub__(self, other: Saved) -> Saved:
        return Saved(*(a - b for a, b in zip(astuple(self), astuple(other), strict=True)))

    def bytes(self, batch: int, tokens: int, text_tokens: int, image_tokens: int = 0) -> int:
        """Bytes for `batch` samples of `tokens` video tokens (on this rank), `text_tokens` text tokens
        and `image_tokens` image tokens."""
        per_sample = tokens * self.token + text_tokens * self.text + image_tokens * self.image + self.sample
        return batch * per_sample + tokens * self.position + self.fixed


class Term(NamedTuple):
    """One line of a block's table: bytes and their role under checkpointing."""

    saved: Saved
    role: str


def _rms_norm_bytes(width: int, heads: int, e: int, kernels: Kernels, fresh_input: bool) -> int:
    """Bytes per token one q/k RMSNorm saves. `fresh_input`: its input is not otherwise saved."""
    if kernels.fused_rms_norm:  # input (if not already kept) + fp32 rstd per head
        return (width * e if fresh_input else 0) + 4 * heads
    copy = 4 * width if fresh_input or e != 4 else 0  # the fp32 input (a copy when e < 4)
    return copy + 4 * heads + 4 * width  # + fp32 rstd per head + the fp32 normalised values


@dataclass(frozen=True)
class _Widths:
    """The sizes every block table needs."""

    d: int  # hidden size
    n: int  # heads
    k: int  # head dim
    m: int  # MLP width
    e: int  # bytes per activation value
    stats: int  # LayerNorm mean and rstd, per token
    rms: int  # one q or k RMSNorm beyond its input (0 without q/k-norm)
    norm_keeps_input: bool  # the q/k RMSNorm saves its input itself (else an fp32 copy, or no norm)


def _widths(model: ModelConfig, e: int, kernels: Kernels) -> _Widths:
    d, n, qk = model.hidden_size, model.num_heads, model.qk_norm
    return _Widths(
        d=d, n=n, k=d // n, m=mlp_width(model), e=e, stats=2 * (kernels.norm_stats_bytes or e),
        rms=_rms_norm_bytes(d, n, e, kernels, fresh_input=False) if qk else 0,
        norm_keeps_input=qk and (kernels.fused_rms_norm or e == 4),
    )  # fmt: skip


def mlp_width(model: ModelConfig) -> int:
    """M: the MLP's (Wan: the FFN's) hidden width."""
    if model.variant == "wan" and model.ffn_dim is not None:
        return model.ffn_dim
    return int(model.hidden_size * model.mlp_ratio)


def _token(n: int) -> Saved:
    return Saved(token=n)


def _text(n: int) -> Saved:
    return Saved(text=n)


def _sample(n: int) -> Saved:
    return Saved(sample=n)


def _rope_table(w: _Widths) -> Saved:
    """The RoPE table every block reads (models/rope.py `RopeTable`): fp32 cos and sin, K each per
    position, kept once in the model's cache; a block saves nothing of its own for RoPE."""
    return Saved(position=8 * w.k)


def _cross_attention_terms(model: ModelConfig, w: _Widths, kernels: Kernels) -> dict[str, Term]:
    d, n, m, e, qk = w.d, w.n, w.m, w.e, model.qk_norm
    copied = not kernels.token_major_attention_output  # the attention output copied for its projection
    q_role = KEPT if w.norm_keeps_input or not qk else KEPT_ONLY  # bf16 on CPU: the norm saves an fp32 copy
    if model.shared_modulation:
        modulation = {"modulation (shared + offset; gates)": Term(_sample(6 * d * e), RECOMPUTED)}
    else:
        modulation = {
            "modulation input (SiLU output)": Term(_sample(d * e), RECOMPUTED),
            "modulation output (gates)": Term(_sample(6 * d * e), KEPT),
        }
    return {
        "input (norm1 input)": Term(_token(d * e), INPUT),
        "norm1 mean/rstd": Term(_token(w.stats), RECOMPUTED),
        "norm1 output (adaLN scale)": Term(_token(d * e), RECOMPUTED),
        "qkv input": Term(_token(d * e), RECOMPUTED),
        "qkv output (v, q/k norm inputs)": Term(_token(3 * d * e), KEPT),
        "q/k RMSNorm": Term(_token(2 * w.rms), RECOMPUTED),
        "rotated q, k": Term(_token(2 * d * e), RECOMPUTED),
        "self-attention output, logsumexp": Term(_token(d * e + 4 * n), KEPT),
        # after q-norm, the rotated q is (B, N, L, K) contiguous, and so is the attention output on
        # CPU: a copy; without q-norm RoPE keeps the projection's token-major layout
        "self-attention proj input": Term(_token(d * e if copied and qk else 0), RECOMPUTED),
        "self-attention proj output (gate)": Term(_token(d * e), KEPT),
        "norm2 input, mean/rstd": Term(_token(d * e + w.stats), RECOMPUTED),
        "cross-attention q input": Term(_token(d * e), RECOMPUTED),
        "cross-attention q (q-norm input)": Term(_token(d * e), q_role),
        "cross-attention q RMSNorm, normalised q": Term(_token(w.rms + d * e if qk else 0), RECOMPUTED),
        "cross-attention output, logsumexp": Term(_token(d * e + 4 * n), KEPT),
        # without q-norm, q is a view of its (B, L, D) projection and the output follows its layout
        "cross-attention proj input": Term(_token(d * e if copied and qk else 0), RECOMPUTED),
        "cross-attention proj output (into the residual)": Term(_token(d * e), KEPT_ONLY),
        "norm3 input, mean/rstd, output": Term(_token(2 * d * e + w.stats), RECOMPUTED),
        "fc1 input": Term(_token(d * e), RECOMPUTED),
        "GELU input (fc1 output)": Term(_token(m * e), KEPT),
        "fc2 input": Term(_token(m * e), RECOMPUTED),
        "fc2 output (gate)": Term(_token(d * e), KEPT),
        "cross-attention kv output (k-norm input, v)": Term(_text(2 * d * e), KEPT),
        "cross-attention k RMSNorm, normalised k": Term(_text(w.rms + d * e if qk else 0), RECOMPUTED),
        "cross-attention additive mask": Term(_text(e), RECOMPUTED),
        **modulation,
        "1 + scale, twice": Term(_sample(2 * d * e), RECOMPUTED),
    }


def _stream_terms(w: _Widths, name: str, unit: Callable[[int], Saved], keys_only: bool) -> dict[str, Term]:
    """One stream of a double-stream block (`unit`: `_token` for video, `_text` for text)."""
    d, n, m, e = w.d, w.n, w.m, w.e
    projected = KEPT if w.norm_keeps_input else KEPT_ONLY  # else only the q/k norms' fp32 copies are saved
    if keys_only:
        return {
            f"{name} input (norm1 input)": Term(unit(d * e), INPUT),
            f"{name} norm1 mean/rstd, output; kv input": Term(unit(2 * d * e + w.stats), RECOMPUTED),
            f"{name} kv output (k-norm input)": Term(unit(2 * d * e), projected),
            f"{name} k RMSNorm": Term(unit(w.rms), RECOMPUTED),
            f"{name} joint attention k, v; additive mask": Term(unit(2 * d * e + e), RECOMPUTED),
            f"{name} modulation input (SiLU output), 1 + scale": Term(_sample(2 * d * e), RECOMPUTED),
            f"{name} modulation output": Term(_sample(2 * d * e), KEPT_ONLY),
        }
    return {
        f"{name} input (norm1 input)": Term(unit(d * e), INPUT),
        f"{name} norm1 mean/rstd, output; qkv input": Term(unit(2 * d * e + w.stats), RECOMPUTED),
        f"{name} qkv output (q/k norm inputs)": Term(unit(3 * d * e), projected),
        f"{name} q/k RMSNorm": Term(unit(2 * w.rms), RECOMPUTED),
        f"{name} joint attention q, k, v; additive mask": Term(unit(3 * d * e + e), RECOMPUTED),
        f"{name} joint attention output, logsumexp": Term(unit(d * e + 4 * n), KEPT),
        f"{name} proj input (a copy of the output's slice)": Term(unit(d * e), RECOMPUTED),
        f"{name} proj output (gate)": Term(unit(d * e), KEPT),
        f"{name} norm2 input, mean/rstd, output; fc1 input": Term(unit(3 * d * e + w.stats), RECOMPUTED),
        f"{name} GELU input (fc1 output)": Term(unit(m * e), KEPT),
        f"{name} fc2 input": Term(unit(m * e), RECOMPUTED),
        f"{name} fc2 output (gate)": Term(unit(d * e), KEPT),
        f"{name} modulation input (SiLU output), 1 + scale twice": Term(_sample(3 * d * e), RECOMPUTED),
        f"{name} modulation output (gates)": Term(_sample(6 * d * e), KEPT),
    }


def _single_stream_terms(
    w: _Widths, name: str, unit: Callable[[int], Saved], output_used: bool
) -> dict[str, Term]:
    """The video or the text tokens' part of a single-stream block."""
    d, n, m, e = w.d, w.n, w.m, w.e
    # saved as the GELU's input; when the output is unused that GELU is freed, and only the q/k norms may keep it
    projected = KEPT if output_used or w.norm_keeps_input else KEPT_ONLY
    terms = {
        f"{name} input (norm input)": Term(unit(d * e), INPUT),
        f"{name} norm mean/rstd, output; qkv/MLP input": Term(unit(2 * d * e + w.stats), RECOMPUTED),
        f"{name} qkv/MLP output (q/k norm and GELU inputs)": Term(unit((3 * d + m) * e), projected),
        f"{name} q/k RMSNorm": Term(unit(2 * w.rms), RECOMPUTED),
        f"{name} joint attention q, k, v; additive mask": Term(unit(3 * d * e + e), RECOMPUTED),
        f"{name} joint attention output, logsumexp": Term(unit(d * e + 4 * n), KEPT),
    }
    if not output_used:
        return {**terms, f"{name} output projection output (unused)": Term(unit(d * e), KEPT_ONLY)}
    return {
        **terms,
        f"{name} output projection input (attention and GELU outputs)": Term(unit((d + m) * e), RECOMPUTED),
        f"{name} output projection output (gate)": Term(unit(d * e), KEPT),
    }


def _wan_block_terms(
    model: ModelConfig, w: _Widths, kernels: Kernels, timesteps_per_token: bool
) -> dict[str, Term]:
    """A Wan block (models/wan.py: `WanBlock`): fp32 LayerNorms and modulation, RMSNorm over all
    heads of q and k, RoPE from the shared tables, self- and cross-attention, tanh-GELU FFN.

    Nothing in the block saves its own input (the norms save an fp32 copy), so only a checkpoint
    keeps it. The caption's keys and values are per text token; the modulation (the shared
    projection plus the block's table, fp32, read by the gates) per sample, or per video token
    with per-token timesteps (frame conditioning)."""
    d, n, m, e = w.d, w.n, w.m, w.e
    rms = _rms_norm_bytes(d, 1, e, kernels, fresh_input=False)  # one rstd per token: across all heads
    projected = KEPT if w.norm_keeps_input else KEPT_ONLY  # q, k outputs: else only the norms' fp32 copies
    copied = not kernels.token_major_attention_output  # the self-attention output copied for to_out
    modulated = _token if timesteps_per_token else _sample
    norm2 = 4 * d + 8 if model.cross_attn_norm else 0
    copy = 0 if e == 4 else 4 * d  # `.float()` of a bf16 tensor is a copy; of an fp32 one, itself
    terms = {
        "input (residual stream; in fp32 norm1's input)": Term(
            _token(d * e), INPUT if e == 4 else INPUT_ONLY
        ),
        "norm1 input (fp32 copy), mean/rstd, output (fp32)": Term(_token(copy + 4 * d + 8), RECOMPUTED),
        "q/k/v input (modulated norm1 output)": Term(_token(d * e), RECOMPUTED),
        "q, k (RMSNorm inputs)": Term(_token(2 * d * e), projected),
        "q/k RMSNorm": Term(_token(2 * rms), RECOMPUTED),
        "rotated q, k": Term(_token(2 * d * e), RECOMPUTED),
        "v": Term(_token(d * e), KEPT),
        "self-attention output, logsumexp": Term(_token(d * e + 4 * n), KEPT),
        "self-attention to_out input": Term(_token(d * e if copied else 0), RECOMPUTED),
        "self-attention to_out output (gate)": Term(_token(d * e), KEPT),
        "norm2 input (fp32 copy), mean/rstd": Term(_token(norm2), RECOMPUTED),
        "norm2 weight and bias (fp32 copies)": Term(
            Saved(fixed=8 * d if e != 4 and norm2 else 0), RECOMPUTED
        ),
        "cross-attention q input (norm2 output)": Term(_token(d * e), RECOMPUTED),
        "cross-attention q (RMSNorm input)": Term(_token(d * e), projected),
        "cross-attention q RMSNorm, normalised q": Term(_token(rms + d * e), RECOMPUTED),
        "cross-attention output, logsumexp": Term(_token(d * e + 4 * n), KEPT),
        "cross-attention to_out output (into the residual)": Term(_token(d * e), KEPT_ONLY),
        "norm3 input (fp32 copy), mean/rstd, output (fp32)": Term(_token(8 * d + 8), RECOMPUTED),
        "FFN input (modulated norm3 output)": Term(_token(d * e), RECOMPUTED),
        "GELU input (FFN proj output)": Term(_token(m * e), KEPT),
        "FFN net.2 input (GELU output)": Term(_token(m * e), RECOMPUTED),
        "FFN output (in fp32 the gate's input)": Term(_token(d * e), KEPT if e == 4 else KEPT_ONLY),
        "FFN output (fp32 copy, the gate's input)": Term(_token(copy), RECOMPUTED),
        "cross-attention k (RMSNorm input)": Term(_text(d * e), projected),
        "cross-attention v": Term(_text(d * e), KEPT),
        "cross-attention k RMSNorm, normalised k": Term(_text(rms + d * e), RECOMPUTED),
        "modulation + scale_shift_table (fp32, the gates' input)": Term(modulated(24 * d), RECOMPUTED),
        "1 + scale, twice (fp32)": Term(modulated(8 * d), RECOMPUTED),
    }
    if model.image_dim is not None:  # the same queries over the image tokens, added: to_out reads the sum
        terms |= {
            "image attention output, logsumexp": Term(_token(d * e + 4 * n), KEPT),
            "to_out input (text + image attention outputs)": Term(_token(d * e), RECOMPUTED),
            "image k (RMSNorm input)": Term(Saved(image=d * e), projected),
            "image v": Term(Saved(image=d * e), KEPT),
            "image k RMSNorm, normalised k": Term(Saved(image=rms + d * e), RECOMPUTED),
        }
    return terms


def _wan_lora_block_terms(
    model: ModelConfig, w: _Widths, kernels: Kernels, timesteps_per_token: bool, first: bool
) -> dict[str, Term]:
    """A Wan block whose Linear layers all carry a rank-R LoRA adapter (the default targets) on a
    frozen base: a frozen weight needs no weight gradient, so its input is saved only where an
    adapter or another op needs it, and nothing is saved for the frozen norm weights or for the
    modulation's gradient (the conditioning path needs none). Each adapter saves its R-wide
    lora_A output; selective checkpointing keeps the base and the lora_B outputs too. The first
    block's input needs no gradient: its norm1 saves nothing."""
    d, n, m, e, r = w.d, w.n, w.m, w.e, model.lora.rank
    rms = d * e + 4 if kernels.fused_rms_norm else 4 * d + 4  # its input (CPU: an fp32 copy) and rstd
    copied = not kernels.token_major_attention_output  # the self-attention output copied for to_out
    modulated = _token if timesteps_per_token else _sample
    norm2 = 4 * d + 8 if model.cross_attn_norm else 0
    terms = {
        "input (residual stream)": Term(_token(d * e), INPUT if e == 4 and not first else INPUT_ONLY),
        "norm1 input (fp32 copy), mean/rstd": Term(
            _token(0 if first else (4 * d if e != 4 else 0) + 8), RECOMPUTED
        ),
        "q/k/v input (modulated norm1 output)": Term(_token(d * e), RECOMPUTED),
        "lora_A outputs: q, k, v, to_out, cross q, to_out, FFN x2": Term(_token(8 * r * e), KEPT),
        "base and lora_B outputs (their sums are what later ops save)": Term(
            _token((7 * d + m) * 2 * e), KEPT_ONLY
        ),
        "q, k RMSNorm (input, rstd)": Term(_token(2 * rms), RECOMPUTED),
        "rotated q, k; v": Term(_token(3 * d * e), RECOMPUTED),
        "self-attention output, logsumexp": Term(_token(d * e + 4 * n), KEPT),
        "self-attention to_out input": Term(_token(d * e if copied else 0), RECOMPUTED),
        "norm2 input (fp32 copy), mean/rstd": Term(_token(norm2), RECOMPUTED),
        "norm2 weight and bias (fp32 copies)": Term(
            Saved(fixed=8 * d if e != 4 and norm2 else 0), RECOMPUTED
        ),
        "cross-attention q input (norm2 output)": Term(_token(d * e), RECOMPUTED),
        "cross-attention q RMSNorm, normalised q": Term(_token(rms + d * e), RECOMPUTED),
        "cross-attention output, logsumexp": Term(_token(d * e + 4 * n), KEPT),
        "norm3 input (fp32 copy; in fp32 the residual itself), mean/rstd": Term(
            _token(4 * d + 8), RECOMPUTED
        ),
        "FFN input; GELU input and output": Term(_token(d * e + 2 * m * e), RECOMPUTED),
        "cross-attention lora_A outputs: k, v": Term(_text(2 * r * e), KEPT),
        "cross-attention base and lora_B outputs: k, v": Term(_text(4 * d * e), KEPT_ONLY),
        "cross-attention k RMSNorm, normalised k; v": Term(_text(rms + 2 * d * e), RECOMPUTED),
        "modulation + scale_shift_table (fp32, the gates' input)": Term(modulated(24 * d), RECOMPUTED),
        "1 + scale (fp32)": Term(modulated(4 * d if first else 8 * d), RECOMPUTED),
    }
    if model.image_dim is not None:  # frozen add_k/add_v (no adapter): their outputs need no gradient
        terms |= {
            "image attention output, logsumexp": Term(_token(d * e + 4 * n), KEPT),
            "to_out input (text + image attention outputs)": Term(_token(d * e), RECOMPUTED),
            "image keys and values (frozen; the attention saves them)": Term(
                Saved(image=2 * d * e), RECOMPUTED
            ),
        }
    return terms


def lora_activations(model: ModelConfig) -> bool:
    """Whether the activations follow LoRA's frozen base: Wan with adapters on the default targets.
    Other LoRA runs are planned with the full-training tables, an upper bound (a frozen weight's
    input is saved only where something else needs it)."""
    if not model.lora.enabled or model.variant != "wan":
        return False
    return model.lora.targets is None or tuple(model.lora.targets) == DEFAULT_TARGETS["wan"]


def block_kinds(model: ModelConfig) -> tuple[str, ...]:
    """The kind of each of the model's blocks, in order."""
    if model.variant == "wan":
        return (
            (WAN_LORA_FIRST,) + (WAN_LORA,) * (model.depth - 1)
            if lora_activations(model)
            else (WAN,) * model.depth
        )
    if model.variant != "mmdit":
        return (CROSS_ATTENTION,) * model.depth
    single = model.single_stream_blocks
    kinds = [DOUBLE] * (model.depth - single) + [SINGLE] * single
    kinds[-1] = SINGLE_LAST if single else DOUBLE_KEYS_ONLY
    return tuple(kinds)


def block_terms(
    model: ModelConfig, kind: str, e: int, kernels: Kernels, timesteps_per_token: bool = False
) -> dict[str, Term]:
    """What one block of `kind` (`block_kinds`) saves for backward, op by op, and each tensor's
    role under checkpointing (`e` bytes per activation value; `timesteps_per_token`: Wan with a
    frame mask, whose modulation is per video token)."""
    w = _widths(model, e, kernels)
    if kind == WAN:
        return _wan_block_terms(model, w, kernels, timesteps_per_token)
    if kind in (WAN_LORA_FIRST, WAN_LORA):
        return _wan_lora_block_terms(model, w, kernels, timesteps_per_token, first=kind == WAN_LORA_FIRST)
    if kind == CROSS_ATTENTION:
        return _cross_attention_terms(model, w, kernels)
    if kind in (DOUBLE, DOUBLE_KEYS_ONLY):
        video = _stream_terms(w, "video", _token, keys_only=False)
        text = _stream_terms(w, "text", _text, keys_only=kind == DOUBLE_KEYS_ONLY)
        return {**video, **text}
    video = _single_stream_terms(w, "video", _token, output_used=True)
    text = _single_stream_terms(w, "text", _text, output_used=kind == SINGLE)
    return {
        **video, **text,
        "modulation input (SiLU output), 1 + scale twice": Term(_sample(3 * w.d * e), RECOMPUTED),
        "modulation output (gate)": Term(_sample(3 * w.d * e), KEPT),
    }  # fmt: skip


@dataclass(frozen=True)
class BlockSaves:
    """One block's saved bytes without checkpointing and what each checkpointing keeps."""

    whole: Saved  # without checkpointing
    inputs: Saved  # its own inputs: what a checkpointed block keeps
    inputs_saved: Saved  # the part of `inputs` that `whole` saves too
    kept: Saved  # what selective checkpointing keeps beyond the inputs: matmul and attention outputs
    kept_saved: Saved  # the part of `kept` that `whole` saves too (not made again by the recompute)

    @classmethod
    def of(cls, terms: dict[str, Term]) -> BlockSaves:
        """The sums of a `block_terms` table by role."""

        def total(*roles: str) -> Saved:
            return sum((term.saved for term in terms.values() if term.role in roles), Saved())

        whole, kept = total(INPUT, KEPT, RECOMPUTED), total(KEPT, KEPT_ONLY)
        inputs = total(INPUT, INPUT_ONLY)
        return cls(whole=whole, inputs=inputs, inputs_saved=total(INPUT), kept=kept, kept_saved=total(KEPT))

    def resident(self, selective: bool) -> Saved:
        """What the block keeps from its forward to its backward when checkpointed."""
        return self.inputs + self.kept if selective else self.inputs

    def recomputed(self, selective: bool) -> Saved:
        """What lives again while the checkpointed block is recomputed in backward."""
        return self.whole - self.inputs_saved - (self.kept_saved if selective else Saved())


@dataclass(frozen=True)
class ActivationModel:
    """Saved-for-backward bytes of a model: per block, and what is kept once."""

    blocks: tuple[BlockSaves, ...]  # in order
    shared: Saved  # read by every block, kept once: the adaLN condition (cross-attention: the text)
    checkpoint_shared: Saved  # other inputs checkpointed blocks share, kept once: the text mask
    outside: Saved  # patch embedding, final layer, text encoder or projection, pooling, timestep embedder
    outside_per_full_token: int  # the loss, over the whole (gathered) video, per sample
    transient_per_token: int  # gradients in flight during one block's backward (an estimate)


def activation_model(
    model: ModelConfig, e: int, kernels: Kernels = CUDA_KERNELS, timesteps_per_token: bool = False
) -> ActivationModel:
    """The activation model of a config, for activations of `e` bytes (2: bf16, 4: fp32);
    `timesteps_per_token`: Wan with a frame mask (frame conditioning), one timestep per video token."""
    w = _widths(model, e, kernels)
    kinds = block_kinds(model)
    per_token = timesteps_per_token and model.variant == "wan" and model.frame_conditioning
    terms = {kind: block_terms(model, kind, e, kernels, per_token) for kind in set(kinds)}
    blocks = tuple(BlockSaves.of(terms[kind]) for kind in kinds)
    if model.variant == "wan":
        return _wan_activation_model(model, w, blocks, per_token)
    d = w.d
    patch_values = math.prod(model.patch_size) * planned_latent_channels(model)
    if model.text_encoder == "learned":
        encoder = _learned_encoder_bytes(model, w)
    else:  # TextProjection: LayerNorm input and stats, the projection's input
        encoder = 2 * frozen_text_width(model) * e + w.stats
    cross_attention = model.variant != "mmdit"
    shared = model.shared_modulation  # one modulation projection (outside the blocks) for all of them
    outside_sample = TIME_FREQ_DIM + 4 * d + model.text_dim + 1 + (d if shared else 0)
    return ActivationModel(
        blocks=blocks,
        shared=Saved(text=d * e if cross_attention else 0, sample=d * e) + _rope_table(w),
        # the bool text mask, the shared modulation
        checkpoint_shared=Saved(text=1, sample=6 * d * e if shared else 0),
        outside=Saved(
            token=patch_values * e + 3 * d * e + w.stats,
            text=encoder + model.text_dim * e + 2 * d * e + e,
            sample=outside_sample * e,
        ),
        outside_per_full_token=4 * patch_values,  # the fp32 error the loss squares
        transient_per_token=(2 * w.m + 3 * d) * e,
    )


def _learned_encoder_bytes(model: ModelConfig, w: _Widths) -> int:
    """Per text token: what the learned text encoder saves (per layer: norms, in_proj in/out,
    attention, out_proj, MLP; the final norm; the int64 token ids)."""
    width, heads, e = model.text_dim, model.text_heads, w.e
    layer = 16 * width * e + 2 * w.stats + 4 * heads + heads * e
    return model.text_depth * layer + width * e + w.stats + 8


def _wan_activation_model(
    model: ModelConfig, w: _Widths, blocks: tuple[BlockSaves, ...], per_token: bool
) -> ActivationModel:
    """Wan's (models/wan.py) activation model around its blocks. The caption's embedding (every
    block's cross-attention keys and values read it) and the RoPE cos/sin tables are kept once;
    checkpointed blocks also share the modulation (the projection of the time embedding), per
    sample or, with per-token timesteps, per video token."""
    d, e = w.d, w.e
    lora = lora_activations(model)
    image = model.image_dim is not None and not lora  # under LoRA nothing saves the image embedding
    return ActivationModel(
        blocks=blocks,
        # the caption's (and images') embedding, fp32 cos and sin (K/2 each) of every position
        shared=Saved(text=d * e, image=d * e if image else 0, position=4 * w.k),
        checkpoint_shared=Saved(**{"token" if per_token else "sample": 6 * d * e}),
        outside=_wan_outside(model, w, per_token, lora),
        outside_per_full_token=4 * planned_latent_channels(model) * math.prod(model.patch_size),  # the loss
        transient_per_token=(2 * w.m + 3 * d) * e,
    )


def _wan_outside(model: ModelConfig, w: _Widths, per_token: bool, lora: bool) -> Saved:
    """What Wan saves outside its blocks: the Conv3d patch embedding's input; the time MLP and
    time_proj (per sample, or per video token with per-token timesteps); the text embedder (Linear,
    tanh-GELU, Linear; a learned encoder before it); the image embedder (fp32 LayerNorm, GELU MLP,
    fp32 LayerNorm; not measured); the output: fp32 LayerNorm modulated by the time embedding,
    proj_out. Under LoRA (frozen embedders and output) only the output norm's input and statistics
    and its 1 + scale."""
    d, e = w.d, w.e
    out_scale = d * e  # the output's 1 + scale (the activation dtype)
    if lora:
        per_sample = 0 if per_token else out_scale
        return Saved(token=4 * d + 8 + (out_scale if per_token else 0), sample=per_sample)
    if model.text_encoder == "learned":  # the encoder, its output masked (a copy, and the bool mask)
        text = _learned_encoder_bytes(model, w) + model.text_dim * e + 1
    else:  # the masked frozen embeddings
        text = model.text_dim * e
    time = model.freq_dim * e + 4 * d * e + out_scale  # time MLP, time_proj input, the output's 1 + scale
    patches = (model.in_channels or planned_latent_channels(model)) * math.prod(model.patch_size) * e
    image, weights = 0, 0
    if model.image_dim is not None:
        image = 4 * model.image_dim + 8 + 3 * model.image_dim * e + 4 * d + 8
        weights = 8 * (model.image_dim + d) if e != 4 else 0  # its LayerNorms' fp32 weight copies
    output = 8 * d + 8 + d * e  # norm_out input (fp32) and statistics, its output (fp32), proj_out's input
    return Saved(
        token=patches + output + (time if per_token else 0),
        text=text + 2 * d * e,
        sample=0 if per_token else time,
        image=image,
        fixed=weights,
    )


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one micro-batch on one GPU."""

    saved: int  # saved for backward at the peak (with checkpointing: what is kept + one block recomputed)
    transient: int  # gradients in flight during one block's backward (estimate)


def activation_bytes(
    model: ModelConfig, batch: int, video_tokens: int, *, dtype_bytes: int, policy: str, every: int = 2,
    sequence_parallel: int = 1, kernels: Kernels = CUDA_KERNELS, timesteps_per_token: bool = False,
) -> Activations:  # fmt: skip
    """Activation bytes on one GPU for `batch` samples of `video_tokens` tokens each, under the
    activation checkpointing `policy` (`every`: k of every_k; see `sora_train.parallel.checkpointing`);
    `timesteps_per_token`: the batches carry a frame mask (Wan: per-token modulation)."""
    act = activation_model(model, dtype_bytes, kernels, timesteps_per_token)
    b, t, s = batch, model.text_max_length, tokens_per_rank(video_tokens, sequence_parallel)
    i = image_tokens(model)
    checkpointed = set(checkpointed_blocks(policy, model.depth, every))
    selective = policy == "selective"
    kept = act.shared + act.outside + (act.checkpoint_shared if checkpointed else Saved())
    recomputed = [0]  # while the block with the most to recompute runs again in backward
    for index, block in enumerate(act.blocks):
        if index in checkpointed:
            kept += block.resident(selective)
            recomputed.append(block.recomputed(selective).bytes(b, s, t, i))
        else:
            kept += block.whole
    saved = kept.bytes(b, s, t, i) + b * video_tokens * act.outside_per_full_token + max(recomputed)
    return Activations(saved=saved, transient=b * s * act.transient_per_token)


# ---------------------------------------------------------------------------------------------
# Parameters, gradients, optimizer states


@dataclass(frozen=True)
class StateBytes:
    """Per-GPU bytes of the training state (and what offloading puts in host memory per rank)."""

    parameters: int
    gradients: int
    optimizer: int
    ema: int
    reduce_buffers: int  # DeepSpeed's gradient-reduction buckets, during backward
    step_transient: int  # the fp32 gradient partition at the optimizer step
    host: int  # offloaded to CPU memory, per rank

    @property
    def persistent(self) -> int:
        """Held for the whole step."""
        return self.parameters + self.gradients + self.optimizer + self.ema


def state_bytes(counts: ParameterCounts, parallel: ParallelConfig, world: int, bf16: bool) -> StateBytes:
    """ZeRO-1 shards optimizer states, ZeRO-2 also gradients, ZeRO-3 also parameters, over all `world` ranks.

    Gradients, optimizer states (fp32 master + 2 moments) and the EMA exist for the trainable
    parameters only (LoRA: the adapters); every parameter, frozen or not, has its working copy in
    the training dtype (DeepSpeed casts the whole module), partitioned under ZeRO-3, whole otherwise.
    """
    total, trainable, e = counts.total, counts.trainable, 2 if bf16 else 4
    stage, offload = parallel.zero_stage, parallel.offload_optimizer
    if stage < 3:
        params, host_params = total * e, 0
    else:  # small tensors stay whole on every rank; the rest is sharded and gathered a few at a time
        persistent = sum(n for n in counts.tensor_sizes if n <= parallel.param_persistence_threshold)
        sharded = total - persistent
        prefetch, _ = zero3_fetch_sizes(parallel, max(counts.tensor_sizes))
        gathered = min(sharded, prefetch + max(counts.tensor_sizes))
        partition = math.ceil(sharded / world) * e
        params = persistent * e + gathered * e + (0 if parallel.offload_params else partition)
        host_params = partition if parallel.offload_params else 0
    grads = trainable * e if stage == 1 else math.ceil(trainable / world) * e
    optimizer = math.ceil(trainable / world) * ADAM_BYTES
    fp32_grads = math.ceil(trainable / world) * 4
    overlap = parallel.overlap_comm != "false"  # auto: on, on a GPU
    # The EMA follows the fp32 master: below ZeRO-3 one slice of the flattened trainable parameters
    # (in host memory when the optimizer is offloaded), else each rank's partition of every tensor.
    if stage < 3:
        ema = math.ceil(trainable / world) * EMA_BYTES
        ema, host_ema = (0, ema) if offload else (ema, 0)
    else:
        ema, host_ema = sum(math.ceil(n / world) for n in counts.trainable_sizes) * EMA_BYTES, 0
    return StateBytes(
        parameters=params,
        gradients=0 if offload and stage > 1 else grads,
        optimizer=0 if offload else optimizer,
        ema=ema,
        reduce_buffers=parallel.reduce_bucket_size * e * (2 if overlap else 1),
        step_transient=0 if offload else fp32_grads,
        host=host_params + host_ema + (optimizer + fp32_grads if offload else 0),
    )
