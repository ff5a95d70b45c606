"""MM-DiT: joint text-video attention with separate weights per stream (as in SD3 and Flux).

Shape legend: B batch, C channels, F frames, H height, W width, L video tokens, T text tokens,
D hidden size, N heads, K head dim, M MLP hidden size.

Double-stream blocks keep a video stream and a text stream, each with its own adaLN-Zero
modulation, qkv projection, QK RMSNorm, output projection and MLP. Their queries, keys and values
meet in one attention over the concatenated [text, video] tokens: padded text keys are masked by
the caption mask (which is None, and the attention unmasked, when every caption of the batch keeps
all its tokens: `VideoTransformer.forward` drops the padding none needs), and RoPE rotates the
video tokens only. Optional single-stream blocks follow (`single_stream_blocks`): one set of
weights for both kinds of token, attention and MLP in parallel from one input projection. When
no single-stream block follows, the last double-stream block's text stream only supplies keys and
values, since nothing reads its text output.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from .attention import QKV, TokenLayout
from .dit import (
    DiTShape,
    FinalLayer,
    VideoTokens,
    VideoTransformer,
    feed_forward,
    initialize_weights,
    modulate,
    qk_norm_layer,
)
from .rope import RopeTable, apply_rope


class Stream(nn.Module):
    """One stream's weights in a double-stream block.

    The modulation gives (shift, scale, gate) for attention and for the MLP; a `keys_only` stream
    has only the attention input's (shift, scale), a keys-and-values projection and no output.
    """

    def __init__(self, shape: DiTShape, keys_only: bool = False):
        super().__init__()
        dim, self.num_heads, self.keys_only = shape.hidden_size, shape.num_heads, keys_only
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, (2 if keys_only else 6) * dim))
        self.qkv = nn.Linear(dim, (2 if keys_only else 3) * dim)
        self.k_norm = qk_norm_layer(shape.head_dim, shape.qk_norm)
        if not keys_only:
            self.q_norm = qk_norm_layer(shape.head_dim, shape.qk_norm)
            self.proj = nn.Linear(dim, dim)
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp = feed_forward(dim, shape.mlp_hidden)

    def attention_inputs(self, x: torch.Tensor, modulation: tuple[torch.Tensor, ...]) -> QKV:
        """x (B, L, D) -> normalised queries (None when `keys_only`), keys, and values, (B, N, L, K) each."""
        shift, scale = modulation[:2]
        projected = self.qkv(modulate(self.norm1(x), shift, scale))
        if self.keys_only:
            k, v = rearrange(projected, "b l (two n k) -> two b n l k", two=2, n=self.num_heads)
            return None, self.k_norm(k), v
        q, k, v = rearrange(projected, "b l (three n k) -> three b n l k", three=3, n=self.num_heads)
        return self.q_norm(q), self.k_norm(k), v

    def finish(
        self, x: torch.Tensor, attended: torch.Tensor, modulation: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        """Gated residual of the attention output (B, N, L, K), then the gated MLP: (B, L, D)."""
        gate1, shift2, scale2, gate2 = modulation[2:]
        x = x + gate1[:, None] * self.proj(rearrange(attended, "b n l k -> b l (n k)"))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DoubleStreamBlock(nn.Module):
    """Video and text streams with their own weights, joined in one attention."""

    def __init__(self, shape: DiTShape, text_output: bool = True):
        super().__init__()
        self.video_stream = Stream(shape)
        self.text_stream = Stream(shape, keys_only=not text_output)

    def forward(
        self,
        video: torch.Tensor,
        text: torch.Tensor,
        cond: torch.Tensor,
        text_mask: torch.Tensor | None,
        angles: RopeTable,
        layout: TokenLayout,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """video (B, L, D) this process' tokens, text (B, T, D), cond (B, D), text_mask (B, T) or None
        (every text key attended), angles (a RoPE table) -> the updated video tokens and text tokens (None
        when this block gives no text output)."""
        video_mod = self.video_stream.modulation(cond).chunk(6, dim=-1)  # six (B, D)
        text_mod = self.text_stream.modulation(cond).chunk(2 if self.text_stream.keys_only else 6, dim=-1)
        q, k, v = self.video_stream.attention_inputs(video, video_mod)
        video_heads = (apply_rope(q, angles), apply_rope(k, angles), v)
        text_heads = self.text_stream.attention_inputs(text, text_mod)
        video_out, text_out = layout.joint_attention(video_heads, text_heads, text_mask)
        video = self.video_stream.finish(video, video_out, video_mod)
        return video, None if text_out is None else self.text_stream.finish(text, text_out, text_mod)


class SingleStreamBlock(nn.Module):
    """One set of weights for video and text tokens: adaLN-Zero, then attention and MLP in parallel
    from one input projection, merged by one output projection."""

    def __init__(self, shape: DiTShape):
        super().__init__()
        dim, self.num_heads, self.mlp_hidden = shape.hidden_size, shape.num_heads, shape.mlp_hidden
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))
        self.qkv_mlp = nn.Linear(dim, 3 * dim + self.mlp_hidden)
        self.q_norm = qk_norm_layer(shape.head_dim, shape.qk_norm)
        self.k_norm = qk_norm_layer(shape.head_dim, shape.qk_norm)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.out = nn.Linear(dim + self.mlp_hidden, dim)

    def _project(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> tuple[QKV, torch.Tensor]:
        """x (B, L, D) -> (q, k, v) (B, N, L, K) each and the MLP's hidden activations (B, L, M)."""
        qkv, hidden = self.qkv_mlp(modulate(self.norm(x), shift, scale)).split(
            [3 * x.shape[-1], self.mlp_hidden], dim=-1
        )
        q, k, v = rearrange(qkv, "b l (three n k) -> three b n l k", three=3, n=self.num_heads)
        return (self.q_norm(q), self.k_norm(k), v), self.mlp_act(hidden)

    def _merge(
        self, x: torch.Tensor, attended: torch.Tensor, hidden: torch.Tensor, gate: torch.Tensor
    ) -> torch.Tensor:
        merged = torch.cat([rearrange(attended, "b n l k -> b l (n k)"), hidden], dim=-1)  # (B, L, D + M)
        return x + gate[:, None] * self.out(merged)

    def forward(
        self,
        video: torch.Tensor,
        text: torch.Tensor,
        cond: torch.Tensor,
        text_mask: torch.Tensor | None,
        angles: RopeTable,
        layout: TokenLayout,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As `DoubleStreamBlock.forward`; the text output is always given."""
        shift, scale, gate = self.modulation(cond).chunk(3, dim=-1)  # three (B, D)
        (q, k, v), video_hidden = self._project(video, shift, scale)
        text_heads, text_hidden = self._project(text, shift, scale)
        video_heads = (apply_rope(q, angles), apply_rope(k, angles), v)
        video_out, text_out = layout.joint_attention(video_heads, text_heads, text_mask)
        return self._merge(video, video_out, video_hidden, gate), self._merge(
            text, text_out, text_hidden, gate
        )


class MMDiT(VideoTransformer):
    """Predicts the flow-matching velocity of a (B, C, F, H, W) video given t and text tokens,
    with `depth - single_stream_blocks` double-stream blocks, then the single-stream ones."""

    def __init__(self, shape: DiTShape):
        super().__init__(shape)
        double = shape.depth - shape.single_stream_blocks
        text_output = [i < double - 1 or shape.single_stream_blocks > 0 for i in range(double)]
        blocks: list[nn.Module] = [DoubleStreamBlock(shape, needed) for needed in text_output]
        blocks += [SingleStreamBlock(shape) for _ in range(shape.single_stream_blocks)]
        self.blocks = nn.ModuleList(blocks)
        self.final = FinalLayer(shape.hidden_size, self.patch_values)
        initialize_weights(self)

    def run_blocks(
        self, video: VideoTokens, cond: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None
    ) -> torch.Tensor:
        tokens = video.tokens
        for block in self.blocks:
            tokens, text = block(tokens, text, cond, text_mask, video.angles, self.layout)
        return tokens
