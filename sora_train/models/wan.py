"""Wan's diffusion transformer (Wan 2.1 / 2.2), module for module as diffusers' `WanTransformer3DModel`.

Shape legend: B batch, C_in / C_out input / output channels, F frames, H height, W width,
(pt, ph, pw) patch size, (f, h, w) = (F/pt, H/ph, W/pw) token grid, L = f·h·w video tokens
(L_local: this process' share under sequence parallelism), T text tokens, I image tokens,
E text width, E_img image width, D hidden size, N heads, K head dim (D = N·K), M FFN width,
S sinusoid features of the timestep (`freq_dim`).

Parameter names and shapes are those of diffusers' `WanTransformer3DModel.state_dict()`, so its
weights load with `load_state_dict(strict=True)`, and the forward computes what diffusers computes,
with the same casts (tests/test_wan_model.py holds fp32 outputs to 1e-5):

- a Conv3d patch embedding (kernel = stride = the patch size);
- the condition: sinusoidal features of the timestep (cos first, frequencies 10000^(-i/(S/2))) →
  `time_embedder` (Linear, SiLU, Linear) → SiLU → `time_proj` to six (D,) modulation vectors, to
  which each block adds its own learned (6, D) `scale_shift_table`; the caption's embeddings →
  `text_embedder` (Linear, tanh-GELU, Linear); image-to-video models also embed image features
  (`image_embedder`: LayerNorm, Linear, GELU, Linear, LayerNorm, with a learned position
  embedding for first-last-frame models);
- each block: modulated float32 LayerNorm → self-attention (RMSNorm over all heads of q and of k
  before they are split into heads, then Wan's 3D RoPE) → gated residual; affine float32
  LayerNorm (`cross_attn_norm`) → cross-attention to the text (plus, for image-to-video, a second
  attention of the same queries over the image tokens, added) → residual; modulated LayerNorm →
  tanh-GELU FFN → gated residual;
- the output: LayerNorm modulated by the timestep embedding plus a learned (2, D) table,
  `proj_out` to patch values, unpatchify.

What differs is the interface, shared with `models/dit.py`'s variants: t in [0, 1] (diffusers'
timestep is 1000·t); a text mask (the embeddings past each caption are zeroed, as `WanPipeline`
pads them, and all T text tokens are attended); image features as their own argument instead of
concatenated before 512 text tokens; and frame conditioning as Wan 2.2 TI2V does it, by giving the
tokens of clean frames timestep 0 (diffusers' 2-D `timestep`). RoPE tables are computed once per
grid (angles in float64, as diffusers computes its buffer) and kept in a cache on the model rather
than in a buffer, so the state dict holds exactly diffusers' keys and a cast model keeps float32
tables.

Initialisation is Wan's (and diffusers') own, done where each parameter is created so a model built
partitioned (DeepSpeed ZeRO-3's `zero.Init`) needs no pass over whole tensors afterwards: torch's
default for every Linear and the Conv3d (Kaiming-uniform weights, uniform biases), norm scales one
and biases zero, each `scale_shift_table` (the blocks' (1, 6, D), the output's (1, 2, D)) drawn
from N(0, 1/D), the image position embedding zero. Nothing is zero-initialised: unlike adaLN-Zero,
a fresh Wan model neither starts as the identity nor predicts zero velocity. Fine-tuning replaces
all of it with released weights (`model.init_from`).

Sequence parallelism enters through `self.layout` as for the other variants: the patch tokens,
their RoPE tables and their timesteps are split, self-attention runs through the layout, the
cross-attention is local (every process holds the whole caption), and the output is gathered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from .attention import TokenLayout
from .patch import grid_size, unpatchify
from .rope import TableCache, axis_dims

TIMESTEP_SCALE = 1000.0  # diffusers' timestep for our t in [0, 1]


@dataclass(frozen=True)
class WanShape:
    """The numbers that fix a Wan transformer's parameter shapes, and the constants of its forward.

    `hidden_size` is diffusers' inner_dim (num_attention_heads × attention_head_dim). Image-to-video
    models set `image_dim` (the image encoder's width), `added_kv_proj_dim` (= hidden_size) and take
    `in_channels` > `out_channels` (the conditioning latents and mask are concatenated to x).
    """

    hidden_size: int
    depth: int
    num_heads: int
    ffn_dim: int
    patch_size: tuple[int, int, int]
    in_channels: int
    out_channels: int
    text_dim: int
    freq_dim: int = 256
    cross_attn_norm: bool = True
    norm_eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    pos_embed_seq_len: int | None = None
    rope_max_seq_len: int = 1024
    rope_theta: float = 10000.0
    frame_conditioning: bool = False  # clean conditioning frames get timestep 0 (Wan 2.2 TI2V)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def diffusers_config(self) -> dict[str, Any]:
        """The keyword arguments of diffusers' `WanTransformer3DModel` with these shapes."""
        return {
            "patch_size": tuple(self.patch_size), "num_attention_heads": self.num_heads,
            "attention_head_dim": self.head_dim, "in_channels": self.in_channels,
            "out_channels": self.out_channels, "text_dim": self.text_dim, "freq_dim": self.freq_dim,
            "ffn_dim": self.ffn_dim, "num_layers": self.depth, "cross_attn_norm": self.cross_attn_norm,
            "qk_norm": "rms_norm_across_heads", "eps": self.norm_eps, "image_dim": self.image_dim,
            "added_kv_proj_dim": self.added_kv_proj_dim, "rope_max_seq_len": self.rope_max_seq_len,
            "pos_embed_seq_len": self.pos_embed_seq_len,
        }  # fmt: skip

    @classmethod
    def from_diffusers_config(cls, config: dict[str, Any], **overrides: Any) -> WanShape:
        """The shape of a diffusers `WanTransformer3DModel` config (its config.json as a dict)."""
        heads = config["num_attention_heads"]
        values = {
            "hidden_size": heads * config["attention_head_dim"], "depth": config["num_layers"],
            "num_heads": heads, "ffn_dim": config["ffn_dim"], "patch_size": tuple(config["patch_size"]),
            "in_channels": config["in_channels"],
            "out_channels": config.get("out_channels") or config["in_channels"],
            "text_dim": config["text_dim"], "freq_dim": config.get("freq_dim", 256),
            "cross_attn_norm": config.get("cross_attn_norm", True), "norm_eps": config.get("eps", 1e-6),
            "image_dim": config.get("image_dim"), "added_kv_proj_dim": config.get("added_kv_proj_dim"),
            "pos_embed_seq_len": config.get("pos_embed_seq_len"),
            "rope_max_seq_len": config.get("rope_max_seq_len", 1024),
        }  # fmt: skip
        return cls(**{**values, **overrides})

    def check(self) -> None:
        """Raise ValueError (one line) when these numbers do not make a Wan transformer."""
        if self.hidden_size % self.num_heads or self.head_dim % 2:
            raise ValueError(
                f"Wan needs hidden_size {self.hidden_size} = num_heads {self.num_heads} × an even head dim"
            )
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            raise ValueError("Wan's image_dim and added_kv_proj_dim go together (image-to-video models)")
        if self.added_kv_proj_dim not in (None, self.hidden_size):
            raise ValueError(
                f"Wan's added_kv_proj_dim {self.added_kv_proj_dim} must equal hidden_size {self.hidden_size}"
            )
        if self.pos_embed_seq_len is not None and self.image_dim is None:
            raise ValueError("Wan's pos_embed_seq_len is for image-to-video models (it needs image_dim)")


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input's dtype, returned in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class TwoLayerMLP(nn.Module):
    """`linear_1`, an activation, `linear_2` (diffusers' TimestepEmbedding / PixArtAlphaTextProjection)."""

    def __init__(self, dim_in: int, dim: int, activation: nn.Module):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim)
        self.act = activation
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class GeluProjection(nn.Module):
    """Linear then GELU, its weights under `proj` (diffusers' `GELU` activation module)."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class FeedForward(nn.Module):
    """(..., dim_in) -> (..., dim_out) through `hidden` GELU units; `net.1` is where diffusers keeps a
    (zero) dropout, so the second Linear is `net.2` as in its state dict."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int, approximate: str):
        super().__init__()
        self.net = nn.Sequential(
            GeluProjection(dim_in, hidden, approximate), nn.Identity(), nn.Linear(hidden, dim_out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def rope_tables(
    grid: tuple[int, int, int], head_dim: int, theta: float, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (L, K/2), float32, of Wan's 3D RoPE for the tokens of a (f, h, w) grid.

    The K/2 channel pairs split into (time, height, width) parts as `rope.axis_dims` (K = 128:
    22, 21, 21 pairs); pair i of an axis part of `dim` channels turns by position · theta^(-2i/dim).
    Angles and their cos/sin are computed in float64, then rounded to float32, as diffusers does.
    """
    tables = []
    for size, dim in zip(grid, axis_dims(head_dim), strict=True):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
        angles = torch.outer(torch.arange(size, dtype=torch.float64, device=device), freqs)  # (size, dim/2)
        tables.append((angles.cos().float(), angles.sin().float()))
    f, h, w = grid

    def spread(parts: list[torch.Tensor]) -> torch.Tensor:
        time, height, width = parts
        return torch.cat([
            repeat(time, "f k -> (f h w) k", h=h, w=w),
            repeat(height, "h k -> (f h w) k", f=f, w=w),
            repeat(width, "w k -> (f h w) k", f=f, h=h),
        ], dim=-1)  # fmt: skip

    return spread([cos for cos, _ in tables]), spread([sin for _, sin in tables])


def apply_wan_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, N, L, K) queries or keys: channels (2i, 2i+1) turn by the angle of pair i, whose
    (L, K/2) cos and sin are given; computed in the tables' float32, returned in x's dtype."""
    real, imag = rearrange(x, "b n l (k two) -> two b n l k", two=2)
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rearrange(rotated, "b n l k two -> b n l (k two)").type_as(x)


class WanAttention(nn.Module):
    """What Wan's self- and cross-attention share: `to_q`/`to_k`/`to_v`, RMSNorm of queries and keys
    over all D channels (before the heads are split), and `to_out.0`."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # diffusers' to_out.1 is a (zero) dropout
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, N, L, K)."""
        return rearrange(x, "b l (n k) -> b n l k", n=self.num_heads)

    def queries_keys_values(
        self, x: torch.Tensor, context: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, N, L, K) of x (B, L, D); keys and values (B, N, S, K) of context (B, S, D)."""
        q = self.heads(self.norm_q(self.to_q(x)))
        k = self.heads(self.norm_k(self.to_k(context)))
        return q, k, self.heads(self.to_v(context))


class WanSelfAttention(WanAttention):
    """Self-attention over the video tokens with Wan's 3D RoPE, run through the token layout."""

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layout: TokenLayout,
    ) -> torch.Tensor:
        """x (B, L_local, D), cos/sin (L_local, K/2) of those tokens -> (B, L_local, D)."""
        q, k, v = self.queries_keys_values(x, x)
        out = layout.self_attention(apply_wan_rope(q, cos, sin), apply_wan_rope(k, cos, sin), v)
        return self.to_out[0](rearrange(out, "b n l k -> b l (n k)").type_as(q))


class WanCrossAttention(WanAttention):
    """Video queries over the text tokens (all of them, unmasked) and, for image-to-video models, the
    same queries over the image tokens (`add_k_proj`, `add_v_proj`, `norm_added_k`), added."""

    def __init__(self, dim: int, num_heads: int, eps: float, image_kv_dim: int | None):
        super().__init__(dim, num_heads, eps)
        if image_kv_dim is not None:
            self.add_k_proj = nn.Linear(image_kv_dim, dim)
            self.add_v_proj = nn.Linear(image_kv_dim, dim)
            self.norm_added_k = nn.RMSNorm(dim, eps=eps)

    def forward(
        self, x: torch.Tensor, text: torch.Tensor, image: torch.Tensor | None, layout: TokenLayout
    ) -> torch.Tensor:
        """x (B, L_local, D), text (B, T, D), image (B, I, D) or None -> (B, L_local, D)."""
        q, k, v = self.queries_keys_values(x, text)
        out = rearrange(layout.cross_attention(q, k, v), "b n l k -> b l (n k)").type_as(q)
        if image is not None:
            k_image = self.heads(self.norm_added_k(self.add_k_proj(image)))
            v_image = self.heads(self.add_v_proj(image))
            image_out = layout.cross_attention(q, k_image, v_image)  # (B, N, L_local, K)
            out = out + rearrange(image_out, "b n l k -> b l (n k)").type_as(q)
        return self.to_out[0](out)


class WanBlock(nn.Module):
    """Modulated self-attention, cross-attention, modulated FFN; residual sums in float32.

    `modulation` (B, L_local or 1, 6, D) is the shared projection of the timestep embedding; the
    block adds its `scale_shift_table` and reads (shift, scale, gate) for attention and for the FFN.
    """

    def __init__(self, shape: WanShape):
        super().__init__()
        dim, eps = shape.hidden_size, shape.norm_eps
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = WanSelfAttention(dim, shape.num_heads, eps)
        self.attn2 = WanCrossAttention(dim, shape.num_heads, eps, shape.added_kv_proj_dim)
        self.norm2 = FP32LayerNorm(dim, eps) if shape.cross_attn_norm else nn.Identity()
        self.ffn = FeedForward(dim, shape.ffn_dim, dim, approximate="tanh")
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) * dim**-0.5)  # N(0, 1/D)

    def forward(
        self,
        x: torch.Tensor,
        text: torch.Tensor,
        image: torch.Tensor | None,
        modulation: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layout: TokenLayout,
    ) -> torch.Tensor:
        """x (B, L_local, D) -> (B, L_local, D); text (B, T, D), image (B, I, D) or None."""
        table = self.scale_shift_table.unsqueeze(0) + modulation.float()  # (B, L_local or 1, 6, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = table.unbind(dim=2)  # six (B, L_local or 1, D)
        normed = torch.addcmul(shift1, self.norm1(x.float()), 1 + scale1).type_as(x)  # fp32 adaLN
        x = (x.float() + self.attn1(normed, cos, sin, layout) * gate1).type_as(x)
        x = x + self.attn2(self.norm2(x.float()).type_as(x), text, image, layout)
        normed = torch.addcmul(shift2, self.norm3(x.float()), 1 + scale2).type_as(x)
        return torch.addcmul(x.float(), self.ffn(normed).float(), gate2).type_as(x)  # fp32 gated residual


class WanImageEmbedder(nn.Module):
    """Image-encoder features (B, I, E_img) -> (B, I, D): LayerNorm, GELU MLP, LayerNorm (float32
    LayerNorms with torch's default eps 1e-5, as diffusers builds them), after adding a learned
    position embedding (first-last-frame models: I = `pos_embed_seq_len`, both images' tokens)."""

    def __init__(self, image_dim: int, dim: int, pos_embed_seq_len: int | None):
        super().__init__()
        self.norm1 = FP32LayerNorm(image_dim)
        self.ff = FeedForward(image_dim, image_dim, dim, approximate="none")
        self.norm2 = FP32LayerNorm(dim)
        self.pos_embed = None
        if pos_embed_seq_len is not None:
            self.pos_embed = nn.Parameter(torch.zeros(1, pos_embed_seq_len, image_dim))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:
            if image.shape[1] != self.pos_embed.shape[1]:
                raise ValueError(
                    f"this model takes {self.pos_embed.shape[1]} image tokens, got {image.shape[1]}"
                )
            image = image + self.pos_embed
        return self.norm2(self.ff(self.norm1(image)))


class Conditions(NamedTuple):
    """The embedded conditions every block reads."""

    time: torch.Tensor  # (B, L_local or 1, D) timestep embedding (the output layer's condition)
    modulation: torch.Tensor  # (B, L_local or 1, 6, D) its projection, shared by the blocks
    text: torch.Tensor  # (B, T, D)
    image: torch.Tensor | None  # (B, I, D) or None


class WanConditionEmbedder(nn.Module):
    """Timesteps, text and (image-to-video) image features -> `Conditions`."""

    def __init__(self, shape: WanShape):
        super().__init__()
        dim = shape.hidden_size
        self.freq_dim = shape.freq_dim
        self.time_embedder = TwoLayerMLP(shape.freq_dim, dim, nn.SiLU())
        self.act_fn = nn.SiLU()
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = TwoLayerMLP(shape.text_dim, dim, nn.GELU(approximate="tanh"))
        self.image_embedder = None
        if shape.image_dim is not None:
            self.image_embedder = WanImageEmbedder(shape.image_dim, dim, shape.pos_embed_seq_len)

    def sinusoid(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(...,) diffusers timesteps in [0, 1000] -> (..., S) features: cos then sin of
        timestep · 10000^(-i/(S/2)), i < S/2, in float32."""
        half = self.freq_dim // 2
        exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
        args = timesteps[..., None].float() * torch.exp(exponent / half)  # (..., S/2)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, timesteps: torch.Tensor, text: torch.Tensor, image: torch.Tensor | None) -> Conditions:
        """timesteps (B, 1) or (B, L_local) in [0, 1000], text (B, T, E), image (B, I, E_img) or None."""
        features = self.sinusoid(timesteps)  # (B, ·, S)
        weight_dtype = self.time_embedder.linear_1.weight.dtype
        time = self.time_embedder(features.to(weight_dtype)).type_as(text)  # (B, ·, D)
        modulation = rearrange(self.time_proj(self.act_fn(time)), "b l (six d) -> b l six d", six=6)
        if (image is None) != (self.image_embedder is None):
            raise ValueError("image features are needed by, and only by, a model built with image_dim")
        image = None if image is None else self.image_embedder(image)
        return Conditions(time, modulation, self.text_embedder(text), image)


class WanTransformer(nn.Module):
    """Predicts the flow-matching velocity of a (B, C_in, F, H, W) video at t given the caption's
    embeddings, with the modules and the computation of diffusers' `WanTransformer3DModel`."""

    def __init__(self, shape: WanShape):
        super().__init__()
        shape.check()
        self.shape = shape
        dim, patch = shape.hidden_size, tuple(shape.patch_size)
        self.patch_embedding = nn.Conv3d(shape.in_channels, dim, kernel_size=patch, stride=patch)
        self.condition_embedder = WanConditionEmbedder(shape)
        self.blocks = nn.ModuleList(WanBlock(shape) for _ in range(shape.depth))
        self.norm_out = FP32LayerNorm(dim, shape.norm_eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, shape.out_channels * math.prod(patch))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) * dim**-0.5)  # N(0, 1/D)
        self.layout = TokenLayout()
        self.rope_cache: TableCache[tuple[torch.Tensor, torch.Tensor]] = TableCache()  # not a buffer

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        frame_mask: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, C_in, F, H, W), t (B,) in [0, 1], text (B, T, E), text_mask (B, T) bool, frame_mask
        (B, F) bool (True: a clean conditioning frame; needs `frame_conditioning`), image (B, I, E_img)
        (image-to-video models) -> the velocity (B, C_out, F, H, W)."""
        grid = self.check_input(x)
        length = math.prod(grid)
        tokens = rearrange(self.patch_embedding(x), "b d f h w -> b (f h w) d")
        tokens = self.layout.split(tokens, dim=1)  # (B, L_local, D)
        cos, sin = self.rope(grid, x.device)  # (L_local, K/2) each
        text = text.masked_fill(~text_mask[..., None], 0)  # as WanPipeline pads each caption
        cond = self.condition_embedder(self.timesteps(t, frame_mask, grid), text, image)
        for block in self.blocks:
            tokens = block(tokens, cond.text, cond.image, cond.modulation, cos, sin, self.layout)
        return self.output(tokens, cond.time, grid, length)

    def check_input(self, x: torch.Tensor) -> tuple[int, int, int]:
        """The token grid (f, h, w) of x; raises ValueError for a video this model cannot take."""
        if x.shape[1] != self.shape.in_channels:
            raise ValueError(f"this model takes {self.shape.in_channels} input channels, got {x.shape[1]}")
        grid = grid_size(tuple(x.shape[2:]), tuple(self.shape.patch_size))
        if max(grid) > self.shape.rope_max_seq_len:
            raise ValueError(f"token grid {grid} exceeds rope_max_seq_len {self.shape.rope_max_seq_len}")
        return grid

    def rope(self, grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (L_local, K/2) of this process' tokens' RoPE angles: built once per grid, device
        and layout (which decides the split), then taken from `rope_cache`."""
        shape, layout = self.shape, self.layout

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            cos, sin = rope_tables(grid, shape.head_dim, shape.rope_theta, device)  # (L, K/2) each
            return layout.split(cos, dim=0), layout.split(sin, dim=0)

        key = (grid, shape.head_dim, shape.rope_theta, device, layout)
        return self.rope_cache.get(key, build)

    def timesteps(
        self, t: torch.Tensor, frame_mask: torch.Tensor | None, grid: tuple[int, int, int]
    ) -> torch.Tensor:
        """Diffusers timesteps: (B, 1) for the whole video, or with `frame_mask` (B, L_local) per token,
        0 on the tokens of clean frames (a token is clean when all its pt frames are)."""
        timesteps = TIMESTEP_SCALE * t.float()[:, None]  # (B, 1)
        if frame_mask is None:
            return timesteps
        if not self.shape.frame_conditioning:
            raise ValueError("this model was not built with frame_conditioning; it takes no frame_mask")
        f, h, w = grid
        clean = rearrange(frame_mask, "b (f pt) -> b f pt", f=f).all(dim=-1)  # (B, f)
        per_frame = torch.where(clean, 0.0, timesteps)  # (B, f)
        frame_of_token = self.layout.split(torch.arange(f, device=t.device).repeat_interleave(h * w), dim=0)
        return per_frame[:, frame_of_token]  # (B, L_local)

    def output(
        self, tokens: torch.Tensor, time: torch.Tensor, grid: tuple[int, int, int], length: int
    ) -> torch.Tensor:
        """This process' final tokens (B, L_local, D) -> the whole velocity (B, C_out, F, H, W)."""
        shift, scale = (self.scale_shift_table.unsqueeze(0) + time.unsqueeze(2)).unbind(dim=2)
        tokens = (self.norm_out(tokens.float()) * (1 + scale) + shift).type_as(tokens)
        patches = self.layout.gather(self.proj_out(tokens), length, dim=1)  # (B, L, pt·ph·pw·C_out)
        return unpatchify(patches, grid, tuple(self.shape.patch_size))
