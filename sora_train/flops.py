"""Training FLOPs per sample, from the model's own structure (the design guide's MFU formula).

    F = W_tok·S + W_txt·T + W_joint·(S + T) + W_img·I + W_sample + W_time·(1 or S)
        + 12·H·K·Σ_blocks Q_b·K_b  [+ 12·L_txt·E·T² for a learned text encoder]

forward + backward, recompute not counted; S video tokens, T text tokens, I image tokens
(image-to-video Wan), H·K the hidden size. W_role is the FLOPs one application of a role's
parameters costs: 6·P_role in full training (the design guide's 6·(P_tok·S + P_txt·T) + 6·P_sample).
Q_b and K_b are a block's attention queries and keys: the cross-attention DiT attends S queries
over S video keys and T text keys (Σ = L·S·(S + T), the design guide's 12·L·H·K·(S² + S·T));
Wan the same, plus S queries over I image keys for image-to-video; MM-DiT attends S + T queries
over S + T keys in every block, except S queries in a last double-stream block whose text stream
only gives keys and values. The parameter counts are read off the denoiser built on the meta
device, each parameter classified by its name with `PARAMETER_ROLES`:

| role     | applied                   | parameters                                                     |
|----------|---------------------------|----------------------------------------------------------------|
| video    | once per video token      | patch embed; each cross-attention block's norms, qkv/proj, q-norms, cross q/proj, MLP; MM-DiT's video streams; final norm and linear; Wan's patch embedding (Conv3d), attn1, attn2's q/norm_q/out, norm2, FFN, proj_out |
| text     | once per text token       | the learned text encoder's layers and final norm (or the TextProjection of a frozen T5), the DiT's text_proj, each cross-attention kv and k-norm; MM-DiT's text streams; Wan's text_embedder and attn2's k/v/norm_k |
| joint    | once per video and text token | MM-DiT's single-stream blocks (one set of weights for both) |
| image    | once per image token      | Wan image-to-video: the image embedder, attn2's add_k/add_v/norm_added_k |
| sample   | once per sample           | timestep embedder, text_pool, every adaLN modulation, the final modulation; Wan's scale_shift_tables |
| time     | once per sample, or per video token with per-token timesteps | Wan's time_embedder and time_proj |
| lookup   | no multiply-adds          | the text encoder's token embedding table and learned positions; Wan's image position embedding |

Per-token timesteps: with frame conditioning Wan gives each video token its own timestep (0 on
clean frames), so its time MLP and `time_proj` (about 7·D² parameters) run once per video token,
not once per sample; `sample_flops(..., timesteps_per_token=True)` counts them so (+0.85% for Wan
2.2 5B at 720p, +0.72% for 14B at 480p; far more for small models). Pass it when the batch carries
a frame mask (`cfg.diffusion.conditions_frames()`).

LoRA (`model.lora.rank > 0`): only the adapters train. MFU counts the work actually done: an
adapter costs 6 FLOPs per parameter and application; a frozen weight 4 (forward and the gradient
of its input, no weight gradient) where a gradient must pass through it to reach an adapter, and 2
(forward only) where none does: the embedders, the text and image side of the cross-attention
(keys and values of the frozen caption embeddings), every modulation, and the first block's
self-attention q/k/v (their input, the patch embedding of a noised clip, needs no gradient). That
is exact for adapters inside the blocks (the defaults); a target in the conditioning path (e.g. the
text embedder) would make some frozen weights behind it need their input gradients too, which this
count leaves out. The frozen model's attention still runs its backward (the adapters need it).

The frozen T5/UMT5 encoder and the VAE are excluded (design guide). Planning works without
model files: a Wan latent space is taken as Wan 2.1's VAE (16 channels, 4× time and 8× space
compression, `WAN_CHANNELS`, `WAN_COMPRESSION`) unless `model.vae_path` holds a config.json (Wan
2.2's VAE: 48 channels, 16× space), and a frozen text encoder whose directory is absent as 4096
wide (T5-XXL / UMT5-XXL, `FROZEN_TEXT_DIM`; Wan takes `model.text_dim`, which must equal it).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig
from .models.denoiser import (
    FrozenTextEmbeddings,
    TextProjection,
    VideoDenoiser,
    build_denoiser,
    build_dit,
    frozen_text_dim,
    wan_shape,
)
from .models.lora import lora_spec, matching_modules

WAN_CHANNELS = 16  # Wan 2.1 VAE latent channels (z_dim), assumed when planning
WAN_COMPRESSION = (4, 8, 8)  # (time, height, width): F = 1 + 4k frames -> 1 + k latent frames
FROZEN_TEXT_DIM = 4096  # d_model of T5-XXL and UMT5-XXL, assumed when the encoder's directory is absent
IMAGE_TOKENS = 257  # CLIP ViT-H/14 features of one 224² image (256 patches + class), Wan 2.1 I2V

VIDEO, TEXT, JOINT, IMAGE, SAMPLE, TIME, LOOKUP = (
    "video",
    "text",
    "joint",
    "image",
    "sample",
    "time",
    "lookup",
)
ROLES = (VIDEO, TEXT, JOINT, IMAGE, SAMPLE, TIME, LOOKUP)

# (pattern on the full parameter name, role); the first matching pattern wins (`*` matches dots too).
PARAMETER_ROLES: tuple[tuple[str, str], ...] = (
    ("text_encoder.token_embed.*", LOOKUP),
    ("text_encoder.pos_embed", LOOKUP),
    ("text_encoder.*", TEXT),
    # Wan (diffusers' WanTransformer3DModel names)
    ("dit.patch_embedding.*", VIDEO),
    ("dit.condition_embedder.time_embedder.*", TIME),
    ("dit.condition_embedder.time_proj.*", TIME),
    ("dit.condition_embedder.text_embedder.*", TEXT),
    ("dit.condition_embedder.image_embedder.pos_embed", LOOKUP),
    ("dit.condition_embedder.image_embedder.*", IMAGE),
    ("dit.blocks.*.attn2.to_k.*", TEXT),
    ("dit.blocks.*.attn2.to_v.*", TEXT),
    ("dit.blocks.*.attn2.norm_k.*", TEXT),
    ("dit.blocks.*.attn2.add_?_proj.*", IMAGE),
    ("dit.blocks.*.attn2.norm_added_k.*", IMAGE),
    ("dit.blocks.*.attn[12].*", VIDEO),
    ("dit.blocks.*.ffn.*", VIDEO),
    ("dit.blocks.*.scale_shift_table", SAMPLE),
    ("dit.scale_shift_table", SAMPLE),
    ("dit.proj_out.*", VIDEO),
    # the cross-attention DiT and MM-DiT
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

# Under LoRA, frozen parameters whose input never needs a gradient (adapters inside the blocks): a
# forward only, 2 FLOPs per parameter and application, as every sample, time, image and lookup
# parameter (the conditioning path). Every other frozen parameter costs 4.
FORWARD_ONLY_WHEN_FROZEN: tuple[str, ...] = (
    "text_encoder.*", "dit.text_proj.*", "dit.patch_embed.*", "dit.patch_embedding.*",
    "dit.condition_embedder.*", "dit.blocks.*.cross_attn.kv.*",
    "dit.blocks.*.attn2.to_[kv].*", "dit.blocks.*.attn2.add_?_proj.*",
    "dit.blocks.0.attn1.to_[qkv].*", "dit.blocks.0.self_attn.qkv.*", "dit.blocks.0.*_stream.qkv.*",
    "dit.blocks.0.qkv_mlp.*",
)  # fmt: skip


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters of a denoiser by how often a training step applies them, and what trains."""

    video: int  # P_tok
    text: int  # P_txt
    joint: int  # P_joint
    image: int  # per image token (Wan image-to-video)
    sample: int  # P_sample
    time: int  # per sample, or per video token with per-token timesteps (Wan)
    lookup: int  # embedding tables: read, not multiplied
    tensor_sizes: tuple[int, ...]  # elements of every parameter tensor, LoRA adapters included
    trainable_sizes: tuple[int, ...]  # elements of every trainable tensor (LoRA: the adapters only)
    work: tuple[tuple[str, int], ...]  # (role, FLOPs of one application of that role's parameters)
    adapters: int = 0  # LoRA adapter parameters (part of the roles' counts)
    adapted_modules: int = 0  # Linear modules with a LoRA adapter

    @property
    def total(self) -> int:
        return self.video + self.text + self.joint + self.image + self.sample + self.time + self.lookup

    @property
    def trainable(self) -> int:
        return sum(self.trainable_sizes)

    def flops_per_application(self, role: str) -> int:
        """FLOPs (forward + backward) of one application of `role`'s parameters."""
        return dict(self.work).get(role, 0)


def planned_latent_channels(model: ModelConfig) -> int:
    """Channels of the tensors the DiT denoises: 3 for pixels, the Wan VAE's (`WAN_CHANNELS` unless
    `model.vae_path` holds its config.json)."""
    if model.latent_space == "pixel":
        return 3
    geometry = wan_vae_geometry(model.vae_path)
    return geometry[0] if geometry else WAN_CHANNELS


def planned_latent_compression(model: ModelConfig) -> tuple[int, int, int]:
    """(time, height, width) compression of the latent space: none for pixels, the Wan VAE's
    (`WAN_COMPRESSION` unless `model.vae_path` holds its config.json)."""
    if model.latent_space == "pixel":
        return (1, 1, 1)
    geometry = wan_vae_geometry(model.vae_path)
    return geometry[1] if geometry else WAN_COMPRESSION


def wan_vae_geometry(path: str | None) -> tuple[int, tuple[int, int, int]] | None:
    """(channels, (time, height, width) compression) of the Wan VAE whose config.json is in `path`
    (as `models.vae.WanVAE` derives them, no weights read); None without the file."""
    if not path or not (Path(path) / "config.json").is_file():
        return None
    config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    temporal = 2 ** sum(bool(down) for down in config.get("temperal_downsample", (False, True, True)))
    spatial = 2 ** (len(config.get("dim_mult", (1, 2, 4, 4))) - 1) * (config.get("patch_size") or 1)
    return int(config["z_dim"]), (temporal, spatial, spatial)


def frozen_text_width(model: ModelConfig) -> int:
    """E_in of a frozen text encoder: Wan's `model.text_dim` (checked against the encoder's d_model
    by the config); else its config.json's d_model, else `FROZEN_TEXT_DIM`."""
    if model.variant == "wan":
        return model.text_dim
    path = model.text_encoder_path
    if path and (Path(path) / "config.json").is_file():
        return frozen_text_dim(path)
    return FROZEN_TEXT_DIM


def image_tokens(model: ModelConfig) -> int:
    """I: image tokens of an image-to-video Wan model (`pos_embed_seq_len` for first-last-frame
    models, else `IMAGE_TOKENS`); 0 without image conditioning."""
    if model.variant != "wan" or model.image_dim is None:
        return 0
    return model.pos_embed_seq_len or IMAGE_TOKENS


def planning_model(model: ModelConfig, device: str | torch.device = "meta") -> VideoDenoiser:
    """The denoiser `build_denoiser` would build, without any model files (on the meta device:
    shapes only, no memory); LoRA adapters are not added (`lora_targets` names the modules).

    The DiT's input channels and a frozen encoder's width come from `planned_latent_channels` and
    `frozen_text_width` instead of the VAE's and the encoder's directories.
    """
    channels = planned_latent_channels(model)
    files_free = replace(model, latent_space="pixel", vae_path=None, text_encoder="learned", init_from=None)
    with torch.device(device):
        if model.variant == "wan":
            shape = replace(
                wan_shape(files_free), in_channels=model.in_channels or channels, out_channels=channels
            )
            frozen = model.text_encoder != "learned"
            encoder = FrozenTextEmbeddings() if frozen else build_denoiser(files_free).text_encoder
            return VideoDenoiser(build_dit(shape), encoder)
        denoiser = build_denoiser(files_free)
        if channels != denoiser.dit.shape.in_channels:
            denoiser.dit = build_dit(replace(denoiser.dit.shape, in_channels=channels))
        if model.text_encoder != "learned":
            denoiser.text_encoder = TextProjection(frozen_text_width(model), model.text_dim)
    return denoiser


def lora_targets(model: ModelConfig) -> tuple[str, ...]:
    """The LoRA target patterns of `model` (`model.lora.targets`, else the variant's defaults)."""
    lora = model.lora
    return lora_spec(model.variant, lora.rank, lora.alpha, lora.dropout, lora.targets).targets


def lora_adapters(model: ModelConfig, denoiser: nn.Module) -> dict[str, tuple[int, int]]:
    """Targeted Linear module name -> (lora_A, lora_B) elements: (R·D_in, R·D_out) each; empty
    without LoRA. Raises ValueError when the targets match no Linear of `denoiser`."""
    if not model.lora.enabled:
        return {}
    names = matching_modules(denoiser, lora_targets(model))
    if not names:
        raise ValueError(f"model.lora.targets {list(lora_targets(model))} match no Linear module")
    modules = dict(denoiser.named_modules())
    rank = model.lora.rank
    return {name: (rank * modules[name].in_features, rank * modules[name].out_features) for name in names}


def parameter_role(name: str) -> str:
    """The role (one of `ROLES`) of a denoiser parameter, by `PARAMETER_ROLES`."""
    for pattern, role in PARAMETER_ROLES:
        if fnmatchcase(name, pattern):
            return role
    raise ValueError(f"parameter {name!r} has no FLOP role; add it to sora_train.flops.PARAMETER_ROLES")


def classify_parameters(module: nn.Module) -> dict[str, str]:
    """Every parameter's name -> its role."""
    return {name: parameter_role(name) for name, _ in module.named_parameters()}


def frozen_factor(name: str) -> int:
    """FLOPs per parameter and application of a frozen parameter under LoRA: 2 (forward only: the
    conditioning path, `FORWARD_ONLY_WHEN_FROZEN`) or 4 (forward and its input's gradient)."""
    if parameter_role(name) in (IMAGE, SAMPLE, TIME, LOOKUP):
        return 2
    return 2 if any(fnmatchcase(name, pattern) for pattern in FORWARD_ONLY_WHEN_FROZEN) else 4


_COUNTS: dict[str, ParameterCounts] = {}


def parameter_counts(model: ModelConfig) -> ParameterCounts:
    """`ParameterCounts` of the denoiser a model config describes, LoRA adapters included (cached per config)."""
    key = json.dumps(asdict(model), sort_keys=True)
    if key not in _COUNTS:
        _COUNTS[key] = _count(model)
    return _COUNTS[key]


def _count(model: ModelConfig) -> ParameterCounts:
    """`parameter_counts` of `model`, uncached."""
    denoiser = planning_model(model)
    sums, work = dict.fromkeys(ROLES, 0), dict.fromkeys(ROLES, 0)
    sizes, trainable = [], []
    lora = model.lora.enabled
    for name, param in denoiser.named_parameters():
        role, n = parameter_role(name), param.numel()
        sums[role] += n
        work[role] += n * (frozen_factor(name) if lora else 6)
        sizes.append(n)
        if not lora:
            trainable.append(n)
    adapters = lora_adapters(model, denoiser)
    for name, (down, up) in adapters.items():
        role = parameter_role(f"{name}.weight")
        sums[role] += down + up
        # lora_A needs no input gradient where its base needs none; lora_B's input always does
        work[role] += down * (4 if frozen_factor(f"{name}.weight") == 2 else 6) + 6 * up
        sizes += [down, up]
        trainable += [down, up]
    return ParameterCounts(
        **sums, tensor_sizes=tuple(sizes), trainable_sizes=tuple(trainable), work=tuple(work.items()),
        adapters=sum(down + up for down, up in adapters.values()), adapted_modules=len(adapters),
    )  # fmt: skip


def sample_flops(
    model: ModelConfig, video_tokens: int, text_tokens: int, *, timesteps_per_token: bool = False
) -> float:
    """Training FLOPs (forward + backward, recompute not counted) of one sample of S video and T text
    tokens. `timesteps_per_token`: the batch carries a frame mask (frame conditioning), so Wan embeds
    one timestep per video token (`cfg.diffusion.conditions_frames()`; ignored by the other variants)."""
    counts = parameter_counts(model)
    s, t, i = video_tokens, text_tokens, image_tokens(model)
    per_token_time = timesteps_per_token and model.variant == "wan" and model.frame_conditioning
    w = counts.flops_per_application
    dense = w(VIDEO) * s + w(TEXT) * t + w(JOINT) * (s + t) + w(IMAGE) * i + w(SAMPLE)
    dense += w(TIME) * (s if per_token_time else 1)
    attention = 12 * model.hidden_size * attention_query_keys(model, s, t)
    if model.text_encoder == "learned":  # the learned encoder's self-attention over the text tokens
        trains = not model.lora.enabled  # frozen under LoRA (adapters sit in the blocks): forward only
        attention += (12 if trains else 4) * model.text_depth * model.text_dim * t * t
    return float(dense + attention)


def attention_query_keys(model: ModelConfig, video_tokens: int, text_tokens: int) -> int:
    """Σ over the blocks of (attention queries × keys) for one sample of S video and T text tokens."""
    s, t = video_tokens, text_tokens
    if model.variant == "mmdit":
        keys_only_block = model.single_stream_blocks == 0  # the last double-stream block: S queries
        return model.depth * (s + t) * (s + t) - keys_only_block * t * (s + t)
    return model.depth * s * (s + t + image_tokens(model))  # self-attention over S, cross over T (and I)
