"""A batch turned into the denoiser's inputs, the same for training and validation."""

from __future__ import annotations

import torch

from .data.decode import to_unit_range
from .data.loader import Batch
from .models.prompts import PromptEncoder
from .models.vae import LatentSpace


def clean_latents(
    batch: Batch, latent_space: LatentSpace | None, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """x0 on `device` in `dtype`: uint8 pixels mapped to [-1, 1] (and encoded when `latent_space`
    is given), or the batch's precomputed latents (`latent_space` None)."""
    x0 = batch["x"].to(device)  # (B, C, f, h, w) float latents, or (B, 3, F, H, W) uint8 pixels
    x0 = to_unit_range(x0, dtype) if x0.dtype == torch.uint8 else x0.to(dtype)
    if latent_space is not None:
        x0 = latent_space.encode(x0).to(dtype)  # pretrained spaces return float32
    return x0


def text_input(
    batch: Batch,
    prompts: PromptEncoder,
    dropped: torch.Tensor | None,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's text input and mask on `device`, the captions `dropped` (B,) bool marks replaced
    by the empty one (caption dropout, for classifier-free guidance; None: none dropped).
    Precomputed embeddings are used when present and the model conditions on a frozen encoder; the
    learned encoder always reads the captions. Embeddings come in `dtype`; token ids stay integers."""
    if dropped is None:
        dropped = torch.zeros(len(batch["caption"]), dtype=torch.bool)
    if "text" in batch and not prompts.learned:
        text, mask = prompts.drop(batch["text"], batch["text_mask"], dropped)
    else:
        captions = ["" if drop else c for c, drop in zip(batch["caption"], dropped.tolist(), strict=True)]
        text, mask = prompts(captions)
    text = text.to(device, dtype) if text.is_floating_point() else text.to(device)
    return text, mask.to(device)
