"""The memory model: what training state and activations take per GPU.

The model (docs/planner.md has the derivation and the measured errors):

- States (AdamW under DeepSpeed ZeRO, sharded over every rank): a working copy of the
  parameters and gradients in the training dtype, an fp32 master copy and two fp32 moments
  (DeepSpeed keeps the fp32 master even when training in fp32), the fp32 EMA whole on every
  rank (`sora_train/ema.py`), DeepSpeed's gradient-reduction buckets during backward, and the
  fp32 gradient partition at the optimizer step.
- Activations: the bytes autograd saves for backward, summed from a per-op table of what each
  DiT block saves (`block_token_terms`), checked against `saved_tensors_hooks` measurements on
  CPU (`measure_activation_bytes`). CUDA saves less than the CPU for RMSNorm (a fused kernel)
  and attention outputs (written token-major): plans for GPUs use `CUDA_KERNELS`, measurements
  on CPU `CPU_KERNELS`. Under full activation
  checkpointing a block keeps only its input, and one block's tensors live again while it is
  recomputed. Gradients in flight during one block's backward are an estimate (`transient`).
- Memory a GPU offers: its total less `RESERVE_BYTES` (CUDA context, NCCL and cuBLAS
  workspaces) and `FRAGMENTATION` of the rest (the caching allocator).

Shape legend: B batch per GPU, S video tokens per sample, s = ceil(S / SP) per GPU, T text
tokens, D hidden size, N heads, K head dim, M MLP width, E text width, e bytes per activation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import ConfigError, ModelConfig, ParallelConfig
from ..data.buckets import Bucket
from ..flops import (
    ParameterCounts,
    frozen_text_width,
    planned_latent_channels,
    planned_latent_compression,
)
from ..models.patch import grid_size

GIB = 2**30
RESERVE_BYTES = 2 * GIB  # CUDA context, NCCL buffers, cuBLAS workspaces: outside PyTorch's allocator
FRAGMENTATION = 0.05  # of the rest, lost to the caching allocator between differently shaped buckets
ADAM_BYTES = 12  # per parameter: fp32 master copy + two fp32 moments
EMA_BYTES = 4  # per parameter: fp32, whole on every rank
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


def _rms_norm_bytes(width: int, heads: int, e: int, kernels: Kernels, fresh_input: bool) -> int:
    """Bytes per token one q/k RMSNorm saves. `fresh_input`: its input is not otherwise saved."""
    if kernels.fused_rms_norm:  # input (if not already kept) + fp32 rstd per head
        return (width * e if fresh_input else 0) + 4 * heads
    copy = 4 * width if fresh_input or e != 4 else 0  # the fp32 input (a copy when e < 4)
    return copy + 4 * heads + 4 * width  # + fp32 rstd per head + the fp32 normalised values


def block_token_terms(model: ModelConfig, e: int, kernels: Kernels) -> dict[str, int]:
    """Bytes one DiT block saves for backward per video token and sample, op by op (`e` bytes per value)."""
    d, n, m = model.hidden_size, model.num_heads, int(model.hidden_size * model.mlp_ratio)
    stats = 2 * (kernels.norm_stats_bytes or e)  # LayerNorm mean and rstd
    qk = model.qk_norm
    copied = not kernels.token_major_attention_output  # the attention output copied for its projection
    return {
        "norm1 input, mean/rstd": d * e + stats,
        "norm1 output (adaLN scale)": d * e,
        "qkv input": d * e,
        "qkv output (v, q/k norm inputs)": 3 * d * e,
        "q/k RMSNorm": 2 * _rms_norm_bytes(d, n, e, kernels, fresh_input=False) if qk else 0,
        "rotated q, k": 2 * d * e,
        "self-attention output, logsumexp": d * e + 4 * n,
        "self-attention proj input": d * e if copied else 0,  # RoPE's q is (B, N, L, K) contiguous
        "self-attention proj output (gate)": d * e,
        "norm2 input, mean/rstd": d * e + stats,
        "cross-attention q input": d * e,
        "cross-attention q (and its RMSNorm)": d * e + (_rms_norm_bytes(d, n, e, kernels, True) if qk else 0),
        "cross-attention output, logsumexp": d * e + 4 * n,
        "cross-attention proj input": d * e if copied and qk else 0,  # without q-norm q is a view
        "norm3 input, mean/rstd, output": 2 * d * e + stats,
        "fc1 input": d * e,
        "GELU input, fc2 input": 2 * m * e,
        "fc2 output (gate)": d * e,
    }


@dataclass(frozen=True)
class ActivationModel:
    """Saved-for-backward bytes, by what they scale with (each per sample unless said otherwise)."""

    block_per_token: int  # per block, per video token on this rank
    block_per_text_token: int  # per block, per text token
    block_per_sample: int  # per block (adaLN modulation)
    block_per_position: int  # per block, per video token on this rank, shared by the batch (RoPE cos/sin)
    block_input_per_token: int  # what a checkpointed block keeps: its input
    shared_per_text_token: int  # the projected text every block reads, kept once
    shared_per_sample: int  # the adaLN condition every block reads, kept once
    outside_per_token: int  # patch embedding and final layer, per video token on this rank
    outside_per_full_token: int  # the loss, over the whole (gathered) video
    outside_per_text_token: int  # text encoder or projection, text_proj, pooling
    outside_per_sample: int  # timestep embedder, text_pool, final modulation
    checkpoint_per_position: int  # checkpointed blocks' shared RoPE angles, kept once
    checkpoint_per_text_token: int  # checkpointed blocks' shared text mask, kept once
    transient_per_token: int  # gradients in flight during one block's backward (an estimate)


def activation_model(model: ModelConfig, e: int, kernels: Kernels = CUDA_KERNELS) -> ActivationModel:
    """The activation model of a config, for activations of `e` bytes (2: bf16, 4: fp32)."""
    d, n = model.hidden_size, model.num_heads
    k, m = d // n, int(d * model.mlp_ratio)
    stats = 2 * (kernels.norm_stats_bytes or e)
    patch_values = math.prod(model.patch_size) * planned_latent_channels(model)
    text_rms = _rms_norm_bytes(d, n, e, kernels, fresh_input=False) + d * e if model.qk_norm else 0
    if model.text_encoder == "learned":  # per layer: norms, in_proj in/out, attention, out_proj, MLP
        width, heads = model.text_dim, model.text_heads
        layer = 16 * width * e + 2 * stats + 4 * heads + heads * e
        encoder = model.text_depth * layer + width * e + stats + 8  # + final norm + int64 token ids
    else:  # TextProjection: LayerNorm input and stats, the projection's input
        encoder = 2 * frozen_text_width(model) * e + stats
    return ActivationModel(
        block_per_token=sum(block_token_terms(model, e, kernels).values()),
        block_per_text_token=2 * d * e + text_rms + e,  # kv output, k RMSNorm and k, additive mask
        block_per_sample=9 * d * e,  # SiLU output, modulation output, 1 + scale twice
        block_per_position=8 * k,  # cos and sin (fp32, K/2 each) for q and for k
        block_input_per_token=d * e,
        shared_per_text_token=d * e,
        shared_per_sample=d * e,
        outside_per_token=patch_values * e + 3 * d * e + stats,
        outside_per_full_token=4 * patch_values,  # the fp32 error the loss squares
        outside_per_text_token=encoder + model.text_dim * e + 2 * d * e + e,
        outside_per_sample=(TIME_FREQ_DIM + 4 * d + model.text_dim + 1) * e,
        checkpoint_per_position=2 * k,  # fp32 RoPE angles, K/2 per token
        checkpoint_per_text_token=1,  # bool mask
        transient_per_token=(2 * m + 3 * d) * e,
    )


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one micro-batch on one GPU."""

    saved: int  # saved for backward at the peak (with checkpointing: inputs + one block recomputed)
    transient: int  # gradients in flight during one block's backward (estimate)


def activation_bytes(
    model: ModelConfig, batch: int, video_tokens: int, *, dtype_bytes: int, checkpointing: bool,
    sequence_parallel: int = 1, kernels: Kernels = CUDA_KERNELS,
) -> Activations:  # fmt: skip
    """Activation bytes on one GPU for `batch` samples of `video_tokens` tokens each."""
    act = activation_model(model, dtype_bytes, kernels)
    b, t, full = batch, model.text_max_length, video_tokens
    s = tokens_per_rank(video_tokens, sequence_parallel)
    block = b * (s * act.block_per_token + t * act.block_per_text_token + act.block_per_sample)
    block += s * act.block_per_position
    outside = b * (
        s * act.outside_per_token + full * act.outside_per_full_token + t * act.outside_per_text_token
        + act.outside_per_sample + t * act.shared_per_text_token + act.shared_per_sample
    )  # fmt: skip
    if checkpointing:  # every block's input, and one block's other tensors while it is recomputed
        kept = model.depth * b * s * act.block_input_per_token + s * act.checkpoint_per_position
        recomputed = block - b * s * act.block_input_per_token
        saved = kept + b * t * act.checkpoint_per_text_token + outside + recomputed
    else:
        saved = model.depth * block + outside
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
    """ZeRO-1 shards optimizer states, ZeRO-2 also gradients, ZeRO-3 also parameters, over all `world` ranks."""
    total, e = counts.total, 2 if bf16 else 4
    stage, offload = parallel.zero_stage, parallel.offload_optimizer
    if stage < 3:
        params, host_params = total * e, 0
    else:  # small tensors stay whole on every rank; the rest is sharded and gathered a few at a time
        persistent = sum(n for n in counts.tensor_sizes if n <= parallel.param_persistence_threshold)
        sharded = total - persistent
        gathered = min(sharded, parallel.prefetch_bucket_size + max(counts.tensor_sizes))
        partition = math.ceil(sharded / world) * e
        params = persistent * e + gathered * e + (0 if parallel.offload_params else partition)
        host_params = partition if parallel.offload_params else 0
    grads = total * e if stage == 1 else math.ceil(total / world) * e
    optimizer = math.ceil(total / world) * ADAM_BYTES
    fp32_grads = math.ceil(total / world) * 4
    overlap = parallel.overlap_comm != "false"  # auto: on, on a GPU
    return StateBytes(
        parameters=params,
        gradients=0 if offload and stage > 1 else grads,
        optimizer=0 if offload else optimizer,
        ema=total * EMA_BYTES,
        reduce_buffers=parallel.reduce_bucket_size * e * (2 if overlap else 1),
        step_transient=0 if offload else fp32_grads,
        host=host_params + (optimizer + fp32_grads if offload else 0),
    )
