"""Training FLOPs per sample, from the model's own structure (the design guide's MFU formula).

    F = 6·(P_tok·S + P_txt·T + P_joint·(S + T)) + 6·P_sample + 12·H·K·Σ_blocks Q_b·K_b
        [+ 12·L_txt·E·T² for a learned text encoder]

forward + backward, recompute not counted; S video tokens, T text tokens, H·K the hidden size.
Q_b and K_b are a block's attention queries and keys: the cross-attention DiT attends S queries
over S video keys and T text keys (Σ = L·S·(S + T), the design guide's 12·L·H·K·(S² + S·T));
MM-DiT attends S + T queries over S + T keys in every block, except S queries in a last
double-stream block whose text stream only gives keys and values. The parameter counts are read
off the denoiser built on the meta device, each parameter classified by its name with
`PARAMETER_ROLES`:

| role     | applied                   | parameters                                                     |
|----------|---------------------------|----------------------------------------------------------------|
| video    | once per video token      | patch embed; each cross-attention block's norms, qkv/proj, q-norms, cross q/proj, MLP; MM-DiT's video streams; final norm and linear |
| text     | once per text token       | the learned text encoder's layers and final norm (or the TextProjection of a frozen T5), the DiT's text_proj, each cross-attention kv and k-norm; MM-DiT's text streams |
| joint    | once per video and text token | MM-DiT's single-stream blocks (one set of weights for both) |
| sample   | once per sample           | timestep embedder, text_pool, every adaLN modulation, the final modulation |
| lookup   | no multiply-adds          | the text encoder's token embedding table and learned positions |

The frozen T5/UMT5 encoder and the VAE are excluded (design guide). Planning works without
model files: a Wan latent space is taken as Wan 2.1's VAE (16 channels, 4× time and 8× space
compression, `WAN_CHANNELS`, `WAN_COMPRESSION`), and a frozen text encoder whose directory is
absent as 4096 wide (T5-XXL / UMT5-XXL, `FROZEN_TEXT_DIM`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig
from .models.denoiser import TextProjection, VideoDenoiser, build_denoiser, build_dit, frozen_text_dim

WAN_CHANNELS = 16  # Wan 2.1 VAE latent channels (z_dim), assumed when planning
WAN_COMPRESSION = (4, 8, 8)  # (time, height, width): F = 1 + 4k frames -> 1 + k latent frames
FROZEN_TEXT_DIM = 4096  # d_model of T5-XXL and UMT5-XXL, assumed when the encoder's directory is absent

VIDEO, TEXT, JOINT, SAMPLE, LOOKUP = "video", "text", "joint", "sample", "lookup"

# (pattern on the full parameter name, role); the first matching pattern wins (`*` matches dots too).
PARAMETER_ROLES: tuple[tuple[str, str], ...] = (
    ("text_encoder.token_embed.*", LOOKUP),
    ("text_encoder.pos_embed", LOOKUP),
    ("text_encoder.*", TEXT),
    ("dit.text_proj.*", TEXT),
    ("dit.blocks.*.cross_attn.kv.*", TEXT),
    ("dit.blocks.*.cross_attn.k_norm.*", TEXT),
    ("dit.time_embed.*", SAMPLE),
    ("dit.text_pool.*", SAMPLE),
    ("dit.blocks.*.modulation.*", SAMPLE),
    ("dit.blocks.*.modulation_offset", SAMPLE),
    ("dit.shared_modulation.*", SAMPLE),
    ("dit.final.modulation.*", SAMPLE),
    ("dit.blocks.*.text_stream.*", TEXT),  # MM-DiT double-stream blocks
    ("dit.blocks.*.video_stream.*", VIDEO),
    ("dit.blocks.*.qkv_mlp.*", JOINT),  # MM-DiT single-stream blocks
    ("dit.blocks.*.out.*", JOINT),
    ("dit.patch_embed.*", VIDEO),
    ("dit.blocks.*.self_attn.*", VIDEO),
    ("dit.blocks.*.cross_attn.q.*", VIDEO),
    ("dit.blocks.*.cross_attn.q_norm.*", VIDEO),
    ("dit.blocks.*.cross_attn.proj.*", VIDEO),
    ("dit.blocks.*.norm?.*", VIDEO),
    ("dit.blocks.*.mlp.*", VIDEO),
    ("dit.final.norm.*", VIDEO),
    ("dit.final.linear.*", VIDEO),
    ("dit.blocks.*.?_norm.*", JOINT),  # single-stream QK norms (the streams' matched above)
)


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters of a denoiser by how often a training step applies them."""

    video: int  # P_tok
    text: int  # P_txt
    joint: int  # P_joint
    sample: int  # P_sample
    lookup: int  # embedding tables: read, not multiplied
    tensor_sizes: tuple[int, ...]  # elements of every parameter tensor (ZeRO-3 treats small ones apart)

    @property
    def total(self) -> int:
        return self.video + self.text + self.joint + self.sample + self.lookup


def planned_latent_channels(model: ModelConfig) -> int:
    """Channels of the tensors the DiT denoises: 3 for pixels, `WAN_CHANNELS` for Wan latents."""
    return 3 if model.latent_space == "pixel" else WAN_CHANNELS


def planned_latent_compression(model: ModelConfig) -> tuple[int, int, int]:
    """(time, height, width) compression of the latent space: none for pixels, `WAN_COMPRESSION` for Wan."""
    return (1, 1, 1) if model.latent_space == "pixel" else WAN_COMPRESSION


def frozen_text_width(model: ModelConfig) -> int:
    """E_in of a frozen text encoder: its config.json's d_model, else `FROZEN_TEXT_DIM`."""
    path = model.text_encoder_path
    if path and (Path(path) / "config.json").is_file():
        return frozen_text_dim(path)
    return FROZEN_TEXT_DIM


def planning_model(model: ModelConfig, device: str | torch.device = "meta") -> VideoDenoiser:
    """The denoiser `build_denoiser` would build, without any model files (on the meta device:
    shapes only, no memory).

    The DiT's input channels and a frozen encoder's width come from `planned_latent_channels` and
    `frozen_text_width` instead of the VAE's and the encoder's directories.
    """
    with torch.device(device):
        denoiser = build_denoiser(replace(model, latent_space="pixel", vae_path=None, text_encoder="learned"))
        if planned_latent_channels(model) != denoiser.dit.shape.in_channels:
            denoiser.dit = build_dit(replace(denoiser.dit.shape, in_channels=planned_latent_channels(model)))
        if model.text_encoder != "learned":
            denoiser.text_encoder = TextProjection(frozen_text_width(model), model.text_dim)
    return denoiser


def parameter_role(name: str) -> str:
    """The role (`VIDEO`, `TEXT`, `JOINT`, `SAMPLE` or `LOOKUP`) of a denoiser parameter, by `PARAMETER_ROLES`."""
    for pattern, role in PARAMETER_ROLES:
        if fnmatchcase(name, pattern):
            return role
    raise ValueError(f"parameter {name!r} has no FLOP role; add it to sora_train.flops.PARAMETER_ROLES")


def classify_parameters(module: nn.Module) -> dict[str, str]:
    """Every parameter's name -> its role."""
    return {name: parameter_role(name) for name, _ in module.named_parameters()}


_COUNTS: dict[str, ParameterCounts] = {}


def parameter_counts(model: ModelConfig) -> ParameterCounts:
    """`ParameterCounts` of the denoiser a model config describes (cached per config)."""
    key = json.dumps(asdict(model), sort_keys=True)
    if key not in _COUNTS:
        denoiser = planning_model(model)
        sums = dict.fromkeys((VIDEO, TEXT, JOINT, SAMPLE, LOOKUP), 0)
        for name, param in denoiser.named_parameters():
            sums[parameter_role(name)] += param.numel()
        sizes = tuple(p.numel() for p in denoiser.parameters())
        _COUNTS[key] = ParameterCounts(**sums, tensor_sizes=sizes)
    return _COUNTS[key]


def sample_flops(model: ModelConfig, video_tokens: int, text_tokens: int) -> float:
    """Training FLOPs (forward + backward, recompute not counted) of one sample of S video and T text tokens."""
    counts = parameter_counts(model)
    s, t = video_tokens, text_tokens
    dense = 6 * (counts.video * s + counts.text * t + counts.joint * (s + t)) + 6 * counts.sample
    attention = 12 * model.hidden_size * attention_query_keys(model, s, t)
    if model.text_encoder == "learned":  # the learned encoder's self-attention over the text tokens
        attention += 12 * model.text_depth * model.text_dim * t * t
    return float(dense + attention)


def attention_query_keys(model: ModelConfig, video_tokens: int, text_tokens: int) -> int:
    """Σ over the blocks of (attention queries × keys) for one sample of S video and T text tokens."""
    s, t = video_tokens, text_tokens
    if model.variant == "mmdit":
        keys_only_block = model.single_stream_blocks == 0  # the last double-stream block: S queries
        return model.depth * (s + t) * (s + t) - keys_only_block * t * (s + t)
    return model.depth * s * (s + t)  # self-attention over S, cross-attention over T
