"""Diffusion transformers over spacetime patches: what both variants share, and the cross-attention DiT.

Shape legend: B batch, C channels, F frames, H height, W width, L = f·h·w video tokens,
T text tokens, D hidden size, N heads, K head dim, P = pt·ph·pw·C values per patch.

`VideoTransformer` holds the parts every variant has: the patch embedding (with an extra input
channel marking clean conditioning frames under `frame_conditioning`), the timestep and caption
condition, the text projection, the output layer and the token layout. The cross-attention `DiT`
adds blocks of adaLN-Zero-modulated self-attention (3D RoPE, QK RMSNorm) → cross-attention to the
text tokens → adaLN-Zero-modulated MLP; `models/mmdit.py` has the joint-attention variant. The
modulation is conditioned on the timestep and on the mean of the caption's token embeddings. The
output layer is zero-initialised, so a fresh model predicts zero velocity. The modules are plain
torch: parallelism, activation checkpointing and compilation are applied from `sora_train.parallel`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from einops import rearrange, repeat
from torch import nn

from .attention import TokenLayout
from .patch import grid_size, patchify, unpatchify
from .rope import RopeTable, TableCache, apply_rope, grid_positions, rope_angles, rope_table, sincos_embedding


@dataclass(frozen=True)
class DiTShape:
    """The numbers that fix a DiT's parameter shapes."""

    hidden_size: int
    depth: int
    num_heads: int
    mlp_ratio: float
    patch_size: tuple[int, int, int]
    in_channels: int
    text_dim: int
    qk_norm: bool = True
    rope_theta: float = 10000.0
    absolute_positions: bool = False
    shared_modulation: bool = False  # one adaLN projection for all blocks, plus a learned offset per block
    rope_axis_dims: tuple[int, int, int] | None = None  # (time, height, width) parts of the head dim
    variant: str = "cross_attention"  # or mmdit (models/mmdit.py)
    single_stream_blocks: int = 0  # mmdit: the last this many blocks are single-stream
    frame_conditioning: bool = False  # the input carries a mask channel of clean conditioning frames

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, L, D) scaled and shifted per sample by (B, D) vectors, x·(1 + scale) + shift
    as one multiply-add (one kernel in eager mode; fused with the norm before it when compiled)."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


def gated_residual(x: torch.Tensor, gate: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """adaLN-Zero's residual: x + gate·update for x, update (B, L, D) and a per-sample gate (B, D),
    as one multiply-add (one kernel in eager mode; fused with its neighbours when compiled)."""
    return torch.addcmul(x, gate[:, None], update)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features -> MLP -> (B, D)."""

    def __init__(self, hidden_size: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(
            nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(
            -math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half
        )
        args = 1000.0 * t.float()[:, None] * freqs[None]  # (B, freq_dim/2)
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


def feed_forward(dim: int, hidden: int) -> nn.Sequential:
    """The transformer MLP: Linear, tanh-GELU, Linear."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


def qk_norm_layer(head_dim: int, enabled: bool) -> nn.Module:
    """RMSNorm over the head dim of queries or keys, or the identity."""
    return nn.RMSNorm(head_dim) if enabled else nn.Identity()


class SelfAttention(nn.Module):
    """Multi-head self-attention over video tokens with 3D RoPE and optional QK RMSNorm."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = qk_norm_layer(dim // num_heads, qk_norm)
        self.k_norm = qk_norm_layer(dim // num_heads, qk_norm)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, angles: RopeTable, layout: TokenLayout) -> torch.Tensor:
        """x (B, L, D) this process' tokens, angles their (L, K) RoPE table -> (B, L, D)."""
        q, k, v = rearrange(self.qkv(x), "b l (three n k) -> three b n l k", three=3, n=self.num_heads)
        q, k = apply_rope(self.q_norm(q), angles), apply_rope(self.k_norm(k), angles)
        out = layout.self_attention(q, k, v)  # (B, N, L, K)
        return self.proj(rearrange(out, "b n l k -> b l (n k)"))


class CrossAttention(nn.Module):
    """Video tokens (queries) attend to text tokens (keys/values), masked by the text mask (None:
    unmasked), through the token layout (which runs the chosen attention kernel)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = qk_norm_layer(dim // num_heads, qk_norm)
        self.k_norm = qk_norm_layer(dim // num_heads, qk_norm)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None, layout: TokenLayout
    ) -> torch.Tensor:
        """x (B, L, D) this process' tokens, text (B, T, D), text_mask (B, T) or None -> (B, L, D)."""
        q = rearrange(self.q(x), "b l (n k) -> b n l k", n=self.num_heads)
        k, v = rearrange(self.kv(text), "b t (two n k) -> two b n t k", two=2, n=self.num_heads)
        out = layout.cross_attention(self.q_norm(q), self.k_norm(k), v, text_mask)  # (B, N, L, K)
        return self.proj(rearrange(out, "b n l k -> b l (n k)"))


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention, cross-attention, adaLN-Zero MLP.

    The six modulation vectors come from the block's own projection of the condition, or (with
    `shape.shared_modulation`, as in Wan) from one projection shared by every block plus this
    block's learned (6, D) offset, which saves 6·D² parameters per block.
    """

    def __init__(self, shape: DiTShape):
        super().__init__()
        dim = shape.hidden_size
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.self_attn = SelfAttention(dim, shape.num_heads, shape.qk_norm)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = CrossAttention(dim, shape.num_heads, shape.qk_norm)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = feed_forward(dim, shape.mlp_hidden)
        self.shared_modulation = shape.shared_modulation
        if shape.shared_modulation:
            self.modulation_offset = nn.Parameter(torch.zeros(6 * dim))
        else:
            self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None,
        angles: RopeTable,
        layout: TokenLayout,
    ) -> torch.Tensor:
        """`cond`: (B, D) the condition, or (B, 6·D) the shared modulation with `shared_modulation`;
        `angles`: the (L, K) RoPE table of this process' tokens."""
        modulation = cond + self.modulation_offset if self.shared_modulation else self.modulation(cond)
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation.chunk(6, dim=-1)  # six (B, D)
        attended = self.self_attn(modulate(self.norm1(x), shift1, scale1), angles, layout)
        x = gated_residual(x, gate1, attended)
        x = x + self.cross_attn(self.norm2(x), text, text_mask, layout)
        return gated_residual(x, gate2, self.mlp(modulate(self.norm3(x), shift2, scale2)))


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a zero-initialised projection to patch values."""

    def __init__(self, dim: int, patch_values: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_values)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(cond).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class VideoTokens(NamedTuple):
    """A batch of videos as this process' tokens, and what the blocks need to place them."""

    tokens: torch.Tensor  # (B, L_local, D)
    angles: RopeTable  # (L_local, K) the rotation of those tokens by their RoPE angles
    grid: tuple[int, int, int]  # (f, h, w)
    length: int  # L, the whole sample's tokens


class VideoTransformer(nn.Module):
    """What every variant shares: embeddings in, the output layer out, and the token layout.

    `layout` decides which of a sample's tokens this process computes (all of them, unless
    sequence parallelism replaced it); the input and the output are always whole videos.
    Subclasses create their blocks between `super().__init__` and `self.final`, so parameters
    keep the order patch embedding, timestep, text, blocks, output.
    """

    def __init__(self, shape: DiTShape):
        super().__init__()
        if shape.hidden_size % shape.num_heads:
            raise ValueError(
                f"hidden_size {shape.hidden_size} is not divisible by num_heads {shape.num_heads}"
            )
        self.shape = shape
        self.patch_values = math.prod(shape.patch_size) * shape.in_channels
        input_channels = shape.in_channels + int(shape.frame_conditioning)
        self.patch_embed = nn.Linear(math.prod(shape.patch_size) * input_channels, shape.hidden_size)
        self.time_embed = TimestepEmbedder(shape.hidden_size)
        self.text_proj = nn.Sequential(
            nn.Linear(shape.text_dim, shape.hidden_size), nn.GELU(approximate="tanh"),
            nn.Linear(shape.hidden_size, shape.hidden_size),
        )  # fmt: skip
        self.text_pool = nn.Linear(shape.text_dim, shape.hidden_size)  # pooled caption -> adaLN condition
        self.layout = TokenLayout()
        self.rope_cache: TableCache[RopeTable] = TableCache()  # not a buffer: never in a state dict

    def embed_video(self, x: torch.Tensor, frame_mask: torch.Tensor | None) -> VideoTokens:
        """x (B, C, F, H, W) -> this process' tokens; `frame_mask` (B, F) True on clean
        conditioning frames becomes the extra input channel (all False when None)."""
        patch, layout = self.shape.patch_size, self.layout
        if self.shape.frame_conditioning:
            if frame_mask is None:
                frame_mask = torch.zeros(x.shape[0], x.shape[2], dtype=torch.bool, device=x.device)
            height, width = x.shape[3:]
            channel = repeat(frame_mask.to(x.dtype), "b f -> b 1 f h w", h=height, w=width)
            x = torch.cat([x, channel], dim=1)  # (B, C + 1, F, H, W)
        elif frame_mask is not None:
            raise ValueError("this model was not built with frame_conditioning; it takes no frame_mask")
        grid = grid_size(tuple(x.shape[2:]), patch)
        length = math.prod(grid)
        tokens = self.patch_embed(layout.split(patchify(x, patch), dim=1))  # (B, L_local, D)
        if self.shape.absolute_positions:
            positions = grid_positions(grid, x.device)  # (L, 3)
            embedding = sincos_embedding(positions, self.shape.hidden_size).to(tokens.dtype)  # (L, D)
            tokens = tokens + layout.split(embedding, dim=0)
        rope = self.rope(grid, x.device)  # (L_local, K) each
        return VideoTokens(tokens, rope, grid, length)

    def rope(self, grid: tuple[int, int, int], device: torch.device) -> RopeTable:
        """The RoPE table of this process' tokens of a (f, h, w) grid, (L_local, K) each: built once
        per grid, device and layout (which decides the split), then taken from `rope_cache`."""
        shape, layout = self.shape, self.layout

        def build() -> RopeTable:
            positions = grid_positions(grid, device)  # (L, 3)
            angles = rope_angles(positions, shape.head_dim, shape.rope_theta, shape.rope_axis_dims)
            return rope_table(layout.split(angles, dim=0))  # from (L_local, K/2) angles

        key = (grid, shape.head_dim, shape.rope_theta, shape.rope_axis_dims, device, layout)
        return self.rope_cache.get(key, build)

    def condition(self, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, D): the timestep embedding plus the projected mean of the caption's token embeddings
        (text_mask (B, T), or None: every token counts)."""
        if text_mask is None:
            pooled = text.mean(1)  # (B, E)
        else:
            weights = text_mask.to(text.dtype)[..., None]  # (B, T, 1)
            pooled = (text * weights).sum(1) / weights.sum(1)  # (B, E)
        return self.time_embed(t) + self.text_pool(pooled)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None,
        frame_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, C, F, H, W), t (B,) in [0, 1], text (B, T, text_dim), text_mask (B, T) bool or None,
        frame_mask (B, F) bool (with `frame_conditioning`) -> the velocity (B, C, F, H, W).

        text_mask None: every text token may be attended, and attention to the text runs unmasked
        (`VideoDenoiser` passes None when every caption of the batch keeps all its tokens)."""
        video = self.embed_video(x, frame_mask)
        cond = self.condition(t, text, text_mask)  # (B, D)
        tokens = self.run_blocks(video, cond, self.text_proj(text), text_mask)
        return self.output(tokens, cond, video)

    def run_blocks(
        self, video: VideoTokens, cond: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The variant's blocks: this process' video tokens and the projected text (B, T, D) with its
        mask (B, T), None when every text token may be attended -> the final video tokens (B, L_local, D)."""
        raise NotImplementedError

    def output(self, tokens: torch.Tensor, cond: torch.Tensor, video: VideoTokens) -> torch.Tensor:
        """This process' final tokens (B, L_local, D) -> the whole predicted velocity (B, C, F, H, W)."""
        patches = self.layout.gather(self.final(tokens, cond), video.length, dim=1)  # (B, L, P)
        return unpatchify(patches, video.grid, self.shape.patch_size)


class DiT(VideoTransformer):
    """Predicts the flow-matching velocity of a (B, C, F, H, W) video given t and text tokens,
    with self-attention over the video and cross-attention to the text in every block."""

    def __init__(self, shape: DiTShape):
        super().__init__(shape)
        self.blocks = nn.ModuleList(DiTBlock(shape) for _ in range(shape.depth))
        if shape.shared_modulation:
            self.shared_modulation = nn.Sequential(
                nn.SiLU(), nn.Linear(shape.hidden_size, 6 * shape.hidden_size)
            )
        self.final = FinalLayer(shape.hidden_size, self.patch_values)
        initialize_weights(self)

    def run_blocks(
        self, video: VideoTokens, cond: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None
    ) -> torch.Tensor:
        block_cond = (
            self.shared_modulation(cond) if self.shape.shared_modulation else cond
        )  # (B, 6D) or (B, D)
        tokens = video.tokens
        for block in self.blocks:
            tokens = block(tokens, block_cond, text, text_mask, video.angles, self.layout)
        return tokens


def initialize_weights(model: VideoTransformer) -> None:
    """All weight init in one place, for both variants.

    Linear layers: Xavier-uniform weights, zero biases. Zero-initialised (adaLN-Zero):
    every adaLN modulation (the blocks', or the shared one and the blocks' offsets, and every
    stream's), the final modulation and the final projection, so each block starts as the
    identity and the model's first prediction is zero.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    nn.init.normal_(model.time_embed.mlp[0].weight, std=0.02)
    nn.init.normal_(model.time_embed.mlp[2].weight, std=0.02)
    zero_layers = [model.final.modulation[-1], model.final.linear]
    if model.shape.shared_modulation:
        zero_layers.append(model.shared_modulation[-1])  # the blocks' offsets start at zero too
    else:
        zero_layers += [
            module[-1]
            for name, module in model.blocks.named_modules()
            if name.endswith("modulation") and isinstance(module, nn.Sequential)
        ]
    for layer in zero_layers:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in module.parameters())
