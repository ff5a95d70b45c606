"""Captions -> the denoiser's text input, for training and sampling alike.

With the learned text encoder the input is token ids from `HashTokenizer`; with a frozen T5 /
UMT5 encoder (`model.text_encoder=t5|umt5`) it is the encoder's embeddings, computed here or
read precomputed from latent shards. The unconditional input (caption dropout in training, the
negative branch of classifier-free guidance) is the empty caption's, in both cases.
Shape legend: B batch, T text tokens, E frozen-encoder width.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from .denoiser import build_tokenizer


class PromptEncoder:
    """`encoder(captions) -> (text input, mask (B, T) bool)`; `drop(...)` swaps rows for the empty caption."""

    def __init__(
        self, cfg: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ):
        """`dtype`: the frozen encoder's parameter dtype (its embeddings are float32 either way)."""
        self.learned = cfg.text_encoder == "learned"
        self.frozen_module: torch.nn.Module | None = None  # the pretrained encoder, when there is one
        if self.learned:
            self._tokenizer = build_tokenizer(cfg)
        else:
            from .text_encoders import build_text_encoder

            self._frozen = build_text_encoder(
                cfg.text_encoder, cfg.text_encoder_path, cfg.text_max_length, device, dtype
            )
            self.frozen_module = self._frozen.model
        self._null: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids (B, T) long, or embeddings (B, T, E) float32; and the mask."""
        return self._tokenizer(captions) if self.learned else self._frozen(captions)

    def null(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty caption's input and mask, padded or cut to `length` tokens (computed once)."""
        if self._null is None:
            self._null = tuple(x[0] for x in self([""]))
        text, mask = self._null
        if text.shape[0] < length:
            pad = length - text.shape[0]
            text = torch.cat([text, text.new_zeros((pad, *text.shape[1:]))])
            mask = torch.cat([mask, mask.new_zeros(pad)])
        return text[:length], mask[:length]

    def drop(
        self, text: torch.Tensor, mask: torch.Tensor, dropped: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace the rows where `dropped` (B,) is true by the empty caption's input."""
        null_text, null_mask = self.null(text.shape[1])
        keep = ~dropped
        text = torch.where(keep.view(-1, *[1] * (text.dim() - 1)), text, null_text.to(text))
        mask = torch.where(keep.view(-1, 1), mask, null_mask.to(mask))
        return text, mask
