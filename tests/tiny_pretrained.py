"""Tiny random pretrained models saved to disk, as users' local checkpoints would be (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

LATENTS_MEAN = [0.5, -0.25, 1.0, 0.0]
LATENTS_STD = [2.0, 0.5, 1.5, 1.0]
WORDS = ["a", "cat", "dog", "runs", "on", "the", "beach", "at", "night", "red", "ball"]


def save_tiny_wan(path: Path) -> str:
    """A random AutoencoderKLWan (temporal 2, spatial 2, z_dim 4) saved to `path`; returns the path."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[True],
        latents_mean=LATENTS_MEAN,
        latents_std=LATENTS_STD,
    )
    vae.save_pretrained(path)
    return str(path)


def save_tiny_t5(model_type: str, path) -> None:
    """A word-level tokenizer (appends </s>, like T5's) and a 1-layer random encoder, saved to `path`."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {word: i for i, word in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    config_class, model_class = {
        "t5": (transformers.T5Config, transformers.T5EncoderModel),
        "umt5": (transformers.UMT5Config, transformers.UMT5EncoderModel),
    }[model_type]
    config = config_class(
        vocab_size=len(vocab),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_heads=4,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(0)
    model_class(config).save_pretrained(path)
    fast.save_pretrained(path)
