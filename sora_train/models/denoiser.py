"""The trainable network: the learned text encoder and the DiT as one module.

This is what DeepSpeed wraps, so both parts train and shard together.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .dit import DiT, DiTShape
from .text import HashTokenizer, TinyTextEncoder
from .vae import latent_channels


class VideoDenoiser(nn.Module):
    """(x_t, t, caption ids, caption mask) -> flow velocity, all shapes as in `DiT.forward`."""

    def __init__(self, dit: DiT, text_encoder: TinyTextEncoder):
        super().__init__()
        self.dit = dit
        self.text_encoder = text_encoder

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        text = self.text_encoder(text_ids, text_mask)  # (B, T, E)
        return self.dit(x, t, text, text_mask)


def dit_shape(cfg: ModelConfig) -> DiTShape:
    """The DiT shape a model config describes."""
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
    )


def build_denoiser(cfg: ModelConfig) -> VideoDenoiser:
    """A freshly initialised denoiser (seed torch's RNG first for a reproducible init)."""
    text_encoder = TinyTextEncoder(
        cfg.text_vocab_size, cfg.text_max_length, cfg.text_dim, cfg.text_depth, cfg.text_heads
    )
    return VideoDenoiser(DiT(dit_shape(cfg)), text_encoder)


def build_tokenizer(cfg: ModelConfig) -> HashTokenizer:
    """The tokenizer matching a model config's text encoder."""
    return HashTokenizer(cfg.text_vocab_size, cfg.text_max_length)
