"""The trainable network: the learned text encoder and the DiT as one module.

This is what DeepSpeed wraps, so both parts train and shard together. With `model.variant=wan`
the DiT is `WanTransformer` (models/wan.py), whose parameters are named as in diffusers'
`WanTransformer3DModel`: the denoiser's are `dit.<diffusers name>`, plus `text_encoder.*` for the
learned encoder (a frozen encoder's embeddings pass through unchanged; Wan projects them itself).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from .attention import drop_caption_padding
from .dit import DiT, DiTShape, VideoTransformer
from .mmdit import MMDiT
from .text import HashTokenizer, TinyTextEncoder
from .vae import latent_channels
from .wan import WanShape, WanTransformer

if TYPE_CHECKING:
    from ..config import ModelConfig

# `model.variant`: the networks `build_dit` builds: cross-attention to the text (`DiT`), joint
# text-video attention with separate weights per stream (`MMDiT`), or Wan's transformer with
# diffusers' parameter names and computation (`WanTransformer`).
ModelVariant = Literal["cross_attention", "mmdit", "wan"]


class TextProjection(nn.Module):
    """Frozen-encoder embeddings (B, T, E_in) -> the DiT's text width (B, T, E): LayerNorm, Linear."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, dim)

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(embeddings))


class FrozenTextEmbeddings(nn.Module):
    """Frozen-encoder embeddings (B, T, E) passed through as they are (no parameters): the Wan
    transformer's own `text_embedder` projects them."""

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return embeddings


TextEncoder = TinyTextEncoder | TextProjection | FrozenTextEmbeddings


class VideoDenoiser(nn.Module):
    """(x_t, t, text input, text mask[, frame mask]) -> flow velocity, all shapes as in `DiT.forward`.

    The text input is token ids (B, T) for the learned encoder, or frozen T5 embeddings
    (B, T, E_in) for a projection; see `models/prompts.py`. For the cross-attention DiT and MM-DiT
    the captions first lose the padding none of them needs, and the DiT gets no mask when every
    caption keeps all the rest (`drop_caption_padding`), so its text attention runs unmasked; Wan
    gets its captions whole, since it attends to their zeroed padding as diffusers' Wan does.
    """

    def __init__(self, dit: VideoTransformer | WanTransformer, text_encoder: TextEncoder):
        super().__init__()
        self.dit = dit
        self.text_encoder = text_encoder

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text_input: torch.Tensor,
        text_mask: torch.Tensor,
        frame_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        dit_mask: torch.Tensor | None = text_mask
        if isinstance(self.dit, VideoTransformer):
            text_input, text_mask, unpadded = drop_caption_padding(text_input, text_mask)  # T -> T'
            dit_mask = None if unpadded else text_mask
        text = self.text_encoder(text_input, text_mask)  # (B, T, E)
        return self.dit(x, t, text, dit_mask, frame_mask)


def dit_shape(cfg: ModelConfig) -> DiTShape | WanShape:
    """The DiT shape a model config describes (a `WanShape` for `variant=wan`)."""
    if cfg.variant == "wan":
        return wan_shape(cfg)
    return DiTShape(
        hidden_size=cfg.hidden_size,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        patch_size=tuple(cfg.patch_size),
        in_channels=latent_channels(cfg.latent_space, cfg.vae_path),
        text_dim=cfg.text_dim,
        qk_norm=cfg.qk_norm,
        rope_theta=cfg.rope_theta,
        absolute_positions=cfg.absolute_positions,
        shared_modulation=cfg.shared_modulation,
        rope_axis_dims=tuple(cfg.rope_axis_dims) if cfg.rope_axis_dims else None,
        variant=cfg.variant,
        single_stream_blocks=cfg.single_stream_blocks,
        frame_conditioning=cfg.frame_conditioning,
    )


def wan_shape(cfg: ModelConfig) -> WanShape:
    """The Wan transformer a `variant=wan` model config describes: it outputs the latent space's
    channels and takes `in_channels` (None: the same; image-to-video: more), and its text input is
    `text_dim` wide (a frozen encoder's width, or the learned encoder's)."""
    out_channels = latent_channels(cfg.latent_space, cfg.vae_path)
    return WanShape(
        hidden_size=cfg.hidden_size,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        ffn_dim=cfg.ffn_dim if cfg.ffn_dim is not None else int(cfg.hidden_size * cfg.mlp_ratio),
        patch_size=tuple(cfg.patch_size),
        in_channels=cfg.in_channels if cfg.in_channels is not None else out_channels,
        out_channels=out_channels,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        cross_attn_norm=cfg.cross_attn_norm,
        norm_eps=cfg.norm_eps,
        image_dim=cfg.image_dim,
        added_kv_proj_dim=cfg.added_kv_proj_dim,
        pos_embed_seq_len=cfg.pos_embed_seq_len,
        rope_max_seq_len=cfg.rope_max_seq_len,
        rope_theta=cfg.rope_theta,
        frame_conditioning=cfg.frame_conditioning,
    )


def build_dit(shape: DiTShape | WanShape) -> VideoTransformer | WanTransformer:
    """The network a shape describes: `WanTransformer` for a `WanShape`; else the variant
    `shape.variant` names, the cross-attention `DiT` or the joint-attention `MMDiT`."""
    if isinstance(shape, WanShape):
        return WanTransformer(shape)
    return MMDiT(shape) if shape.variant == "mmdit" else DiT(shape)


def build_denoiser(cfg: ModelConfig) -> VideoDenoiser:
    """A freshly initialised denoiser (seed torch's RNG first for a reproducible init)."""
    if cfg.text_encoder == "learned":
        text_encoder = TinyTextEncoder(
            cfg.text_vocab_size,
            cfg.text_max_length,
            cfg.text_dim,
            cfg.text_depth,
            cfg.text_heads,
            embed_std=cfg.text_embed_std,
        )
    elif cfg.variant == "wan":  # the frozen encoder's width is model.text_dim (checked by ModelConfig)
        text_encoder = FrozenTextEmbeddings()
    else:
        text_encoder = TextProjection(frozen_text_dim(cfg.text_encoder_path), cfg.text_dim)
    return VideoDenoiser(build_dit(dit_shape(cfg)), text_encoder)


def frozen_text_dim(path: str) -> int:
    """E_in of a frozen T5/UMT5 encoder, from its config.json (no weights loaded)."""
    return int(json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))["d_model"])


def build_tokenizer(cfg: ModelConfig) -> HashTokenizer:
    """The tokenizer matching a model config's text encoder."""
    return HashTokenizer(cfg.text_vocab_size, cfg.text_max_length)
