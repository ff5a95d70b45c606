"""Frozen pretrained text encoders, loaded from a local directory (nothing is downloaded).

`FrozenT5Encoder` wraps a T5 or UMT5 encoder (Wan uses UMT5-XXL) and its tokenizer. It is a
plain object, not an `nn.Module`, so it never ends up in the DiT's parameters, optimizer or
checkpoints. Captions are padded to `max_length`; as in Wan, the embeddings at padded
positions are zeroed, so only real tokens carry signal. Shape legend: B batch, T text tokens
(= max_length), E embedding dim (= d_model).
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch
from einops import rearrange

from .vae import HF_EXTRA_HINT


def _import_transformers() -> Any:
    """The transformers module, or an ImportError that says how to install it."""
    try:
        import transformers
    except ImportError as error:
        raise ImportError(f"pretrained text encoders need transformers; {HF_EXTRA_HINT}") from error
    return transformers


# config.json's model_type -> encoder-only class in transformers
ENCODER_CLASSES = {"t5": "T5EncoderModel", "umt5": "UMT5EncoderModel"}


class FrozenT5Encoder:
    """A frozen T5 / UMT5 encoder and its tokenizer, from `path` (the class follows config.json).

    Args:
        path: directory holding config.json, the weights and the tokenizer files (as written by
            `save_pretrained`).
        max_length: T, the number of tokens every caption is padded / truncated to.
        device: where the encoder runs.
        dtype: the encoder's parameter dtype; embeddings are always returned as float32.
    """

    def __init__(
        self,
        path: str,
        max_length: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        transformers = _import_transformers()
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        if config.model_type not in ENCODER_CLASSES:
            raise ValueError(
                f"{path} holds a {config.model_type!r} model; FrozenT5Encoder supports {sorted(ENCODER_CLASSES)}"
            )
        encoder_class = getattr(transformers, ENCODER_CLASSES[config.model_type])
        self.max_length = max_length
        self.device = torch.device(device)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = encoder_class.from_pretrained(path, config=config, local_files_only=True, torch_dtype=dtype)
        self.model = model.to(self.device).eval().requires_grad_(False)

    @property
    def dim(self) -> int:
        """E, the embedding width (the model's d_model)."""
        return self.model.config.d_model

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (embeddings (B, T, E) float32 on CPU, mask (B, T) bool on CPU).

        T = max_length; longer captions are truncated. Embeddings at padded positions
        (mask False) are exactly zero.
        """
        tokens = self.tokenizer(
            list(captions),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        ids = tokens["input_ids"].to(self.device)  # (B, T)
        mask = tokens["attention_mask"].to(self.device)  # (B, T) 1 = real token
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, E)
        hidden = hidden.float() * rearrange(mask, "b t -> b t 1").float()
        return hidden.cpu(), mask.bool().cpu()


# The frozen pretrained encoders `build_text_encoder` loads.
FrozenTextEncoderName = Literal["t5", "umt5"]
TEXT_ENCODERS: tuple[FrozenTextEncoderName, ...] = get_args(FrozenTextEncoderName)
# `model.text_encoder`: the small encoder trained with the DiT, or a frozen pretrained one.
TextEncoderName = Literal["learned", FrozenTextEncoderName]


def build_text_encoder(
    name: FrozenTextEncoderName,
    path: str,
    max_length: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> FrozenT5Encoder:
    """The pretrained text encoder called `name` ("t5" or "umt5"), loaded from the local `path`.

    Both names load a `FrozenT5Encoder`, which picks T5 or UMT5 from the saved config.
    """
    if name not in TEXT_ENCODERS:
        raise ValueError(f"unknown text encoder {name!r}; choose one of {sorted(TEXT_ENCODERS)}")
    return FrozenT5Encoder(path, max_length, device=device, dtype=dtype)
