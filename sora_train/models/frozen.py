"""What the training loop runs besides the denoiser: the pretrained VAE and text encoder, frozen."""

from __future__ import annotations

from torch import nn

from .prompts import PromptEncoder
from .vae import LatentSpace, WanVAE


def describe_frozen(module: nn.Module) -> dict:
    """Parameters, how many of them would train, the dtype, and whether the module is in training mode."""
    parameters = list(module.parameters())
    return {
        "parameters": sum(p.numel() for p in parameters),
        "trainable": sum(p.numel() for p in parameters if p.requires_grad),
        "dtype": str(parameters[0].dtype).removeprefix("torch."),
        "training_mode": module.training,
    }


def frozen_encoders(latent_space: LatentSpace, prompts: PromptEncoder) -> dict[str, dict]:
    """`describe_frozen` of each pretrained encoder the loop runs in-loop: "vae" and/or "text_encoder"
    (empty in pixel space with the learned text encoder)."""
    encoders = {}
    if isinstance(latent_space, WanVAE):
        encoders["vae"] = describe_frozen(latent_space.vae)
    if prompts.frozen_module is not None:
        encoders["text_encoder"] = describe_frozen(prompts.frozen_module)
    return encoders
