"""Text conditioning: a hashed-word tokenizer and a small learned text encoder for CPU runs.

Any caption works: each lower-cased word is hashed into a fixed vocabulary, so real
captions need no vocabulary file. Every sequence starts with a BOS token, so even an
empty caption (used for caption dropout / classifier-free guidance) keeps one key to
attend to. Shape legend: B batch, T text tokens, E text embedding dim.
"""

from __future__ import annotations

import re
import zlib

import torch
from torch import nn

PAD_ID, BOS_ID, FIRST_WORD_ID = 0, 1, 2
_WORD = re.compile(r"[a-z0-9]+")


class HashTokenizer:
    """Lower-cases, splits into words, and hashes each word (crc32) into `vocab_size` ids."""

    def __init__(self, vocab_size: int, max_length: int):
        if vocab_size <= FIRST_WORD_ID:
            raise ValueError(f"vocab_size must exceed {FIRST_WORD_ID}, got {vocab_size}")
        self.vocab_size = vocab_size
        self.max_length = max_length

    def word_id(self, word: str) -> int:
        """The id of one word (stable across processes and runs, unlike Python's hash())."""
        return FIRST_WORD_ID + zlib.crc32(word.encode()) % (self.vocab_size - FIRST_WORD_ID)

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (ids (B, T) long, mask (B, T) bool); T = max_length, BOS first, truncated."""
        ids = torch.full((len(captions), self.max_length), PAD_ID, dtype=torch.long)
        for row, caption in enumerate(captions):
            words = [BOS_ID] + [self.word_id(w) for w in _WORD.findall(caption.lower())]
            words = words[: self.max_length]
            ids[row, : len(words)] = torch.tensor(words)
        return ids, ids != PAD_ID


class TinyTextEncoder(nn.Module):
    """Token embedding + learned positions + a few transformer layers: ids (B, T) -> (B, T, E).

    `embed_std` is the initial spread of the word embeddings. At 0.02 a word's embedding is small
    beside what the first layer adds to every position (attention that starts out nearly uniform),
    so each output token starts as much the same average of the caption; at 1.0 (torch's default)
    each word keeps its identity in its own output token from the start, and a word whose effect on
    the video is subtle (the synthetic corpus' direction) is not drowned by one with a large effect
    (its colour). The demo's `tiny` preset uses 1.0; see docs/benchmarks.md.
    """

    def __init__(
        self, vocab_size: int, max_length: int, dim: int, depth: int, num_heads: int, embed_std: float = 0.02
    ):
        super().__init__()
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_length, dim))
        layer = nn.TransformerEncoderLayer(
            dim,
            num_heads,
            dim_feedforward=4 * dim,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.layers = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.token_embed.weight, std=embed_std)
        nn.init.normal_(self.pos_embed, std=0.02)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.token_embed(ids) + self.pos_embed[:, : ids.shape[1]]  # (B, T, E)
        x = self.layers(x, src_key_padding_mask=~mask)
        return self.norm(x)
