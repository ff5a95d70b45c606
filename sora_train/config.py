"""The typed source of truth for a run.

Hydra composes `configs/train.yaml` with its groups over the schema registered here;
`to_train_config` turns the result into `TrainConfig` dataclasses and `validate` rejects bad
values and combinations with one clear line, before any process group exists. Nothing
downstream sees a raw DictConfig.

An option is a `Literal` type, declared once by the module that implements it (or here, for the
options this module owns) and rejected generically (`sora_train.options`). Each section checks
its own rules (`check`); the few rules that span sections, the world size or the file system are
in `cross_section_rules`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from .data.buckets import BucketTable, bucket_table, check_bucket_table
from .data.decode import ClipWindow, DecoderName
from .diffusion.conditioning import CONDITIONING_STRATEGIES, ConditioningStrategy
from .diffusion.flow import LossWeighting
from .diffusion.timesteps import MODE_SCALE_MONOTONE, Expert, TimestepSampling, timestep_range
from .models.attention import AttentionBackend
from .models.denoiser import ModelVariant, build_denoiser, frozen_text_dim
from .models.lora import lora_spec, matching_modules
from .models.text_encoders import TextEncoderName
from .models.vae import LatentSpaceName
from .options import OptionError, check_options, from_schema, omegaconf_schema, to_schema
from .parallel.checkpointing import ActivationCheckpointPolicy

# The options this module owns; the others are declared by the modules that implement them.
DataSource = Literal["synthetic", "shards", "latents"]  # `data.name`; latents: see DataConfig.precomputed
Precision = Literal["auto", "fp32", "bf16"]
CheckpointVerification = Literal["checksum", "size"]
AbandonedCheckpoints = Literal["keep", "delete"]
ZeroStage = Literal[1, 2, 3]
OverlapComm = Literal["auto", "true", "false"]
WandbMode = Literal["auto", "online", "offline", "disabled"]


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line."""


class Section:
    """A section of `TrainConfig`. `validate` checks its Literal options (`check_options`), then
    its own rules (`check`), then the rules that span sections."""

    def check(self) -> None:
        """Reject a bad value of this section's own fields (raises ConfigError); none by default."""


@dataclass
class LoraConfig:
    """LoRA adapters (`sora_train/models/lora.py`): with rank > 0 only the adapters train; the base
    weights are frozen and never reach the optimizer. rank 0: full fine-tuning (the default)."""

    rank: int = 0
    alpha: float | None = None  # the update is scaled by alpha / rank; None: alpha = rank
    dropout: float = 0.0  # on the adapters' input
    # Regular expressions (full match) over the denoiser's module names, e.g. dit\.blocks\.\d+\.attn1\.to_q;
    # None: the variant's attention q/k/v/out and FFN (models/lora.py: DEFAULT_TARGETS)
    targets: list[str] | None = None

    @property
    def enabled(self) -> bool:
        return self.rank > 0


@dataclass
class ModelConfig(Section):
    """DiT shape, latent space and text encoder. Presets live in configs/model/*.yaml."""

    preset: str = MISSING
    # cross_attention: self-attention over video, cross-attention to text, MLP per block;
    # mmdit: joint text-video attention with separate weights per stream (MM-DiT);
    # wan: Wan 2.1/2.2's transformer, parameters and computation as diffusers' WanTransformer3DModel
    variant: ModelVariant = "cross_attention"
    single_stream_blocks: int = 0  # mmdit: the last this many of `depth` blocks share one set of weights
    hidden_size: int = MISSING
    depth: int = MISSING
    num_heads: int = MISSING
    mlp_ratio: float = 4.0
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])  # (pt, ph, pw)
    qk_norm: bool = True
    rope_theta: float = 10000.0
    # RoPE's (time, height, width) split of the head dim, each even; None: time gets the remainder
    # of two equal spatial parts (head dim 128: 44, 42, 42)
    rope_axis_dims: list[int] | None = None
    absolute_positions: bool = False  # add a sinusoidal (t, y, x) embedding to the tokens, on top of RoPE
    shared_modulation: bool = False  # one adaLN projection for all blocks + a learned offset per block (Wan)
    # An input channel marks clean conditioning frames (image-to-video, extension); with variant=wan no
    # channel: the tokens of clean frames get timestep 0, as in Wan 2.2 TI2V
    frame_conditioning: bool = False
    # variant=wan only (diffusers' WanTransformer3DModel config; hidden_size = heads × head dim):
    ffn_dim: int | None = None  # FFN width; None: hidden_size × mlp_ratio
    freq_dim: int = 256  # sinusoidal features of the timestep
    cross_attn_norm: bool = True  # affine LayerNorm before the cross-attention
    norm_eps: float = 1e-6
    image_dim: int | None = None  # image-to-video: the image encoder's width (CLIP ViT-H: 1280)
    added_kv_proj_dim: int | None = None  # image-to-video: = hidden_size
    in_channels: int | None = None  # None: the latent space's channels; image-to-video: 36 (latents, mask)
    rope_max_seq_len: int = 1024  # the longest token grid side
    pos_embed_seq_len: int | None = None  # first-last-frame models: image tokens of both frames (514)
    # A diffusers or original-Wan transformer folder whose weights initialise the denoiser (variant=wan);
    # the architecture comes from its config.json: the fields above must equal it (checked here)
    init_from: str | None = None
    nominal_parameters: float | None = None  # the size a preset is named for (checked by the tests)
    latent_space: LatentSpaceName = "pixel"
    vae_path: str | None = None  # local directory of the pretrained VAE (latent_space=wan)
    text_encoder: TextEncoderName = "learned"  # learned (trained with the DiT) | t5 | umt5 (frozen)
    text_encoder_path: str | None = None
    text_vocab_size: int = 4096
    text_max_length: int = 16
    text_dim: int = 128
    text_depth: int = 2
    text_heads: int = 4
    # Initial std of the learned text encoder's word embeddings (models/text.py: 1.0 keeps each word
    # distinct from the start; the tiny preset uses it). Initialisation only: loading ignores it
    text_embed_std: float = 0.02
    lora: LoraConfig = field(default_factory=LoraConfig)

    def check(self) -> None:
        """The shape is buildable and the pretrained parts it names are on disk (raises ConfigError)."""
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ConfigError(
                f"model.patch_size must be three positive ints (pt, ph, pw), got {self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}"
            )
        head_dim = self.hidden_size // self.num_heads
        if head_dim % 2:
            raise ConfigError("model head dim (hidden_size / num_heads) must be even for RoPE")
        axes = self.rope_axis_dims
        if axes is not None and (len(axes) != 3 or sum(axes) != head_dim or any(d % 2 for d in axes)):
            raise ConfigError(
                f"model.rope_axis_dims={axes} must be three even numbers summing to the head dim {head_dim}"
            )
        if self.variant != "cross_attention" and self.shared_modulation:
            raise ConfigError(
                "model.shared_modulation is for model.variant=cross_attention; mmdit blocks modulate per "
                "stream and wan always shares one projection"
            )
        self._check_wan_options()
        if not 0 <= self.single_stream_blocks <= self.depth or (
            self.single_stream_blocks and self.variant != "mmdit"
        ):
            raise ConfigError(
                f"model.single_stream_blocks={self.single_stream_blocks} must be in [0, model.depth] "
                "and needs model.variant=mmdit"
            )
        if min(self.text_depth, self.text_heads) < 1:
            raise ConfigError(
                f"model.text_depth and model.text_heads must be >= 1, got {self.text_depth} and {self.text_heads}"
            )
        if self.text_dim % self.text_heads:
            raise ConfigError(
                f"model.text_dim={self.text_dim} is not divisible by model.text_heads={self.text_heads}"
            )
        if self.text_embed_std <= 0:
            raise ConfigError(f"model.text_embed_std must be > 0, got {self.text_embed_std}")
        if self.latent_space == "wan" and not _holds_config_json(self.vae_path):
            raise ConfigError(
                f"model.latent_space=wan needs model.vae_path= a local VAE directory, got {self.vae_path}"
            )
        if self.text_encoder != "learned" and not _holds_config_json(self.text_encoder_path):
            raise ConfigError(
                f"model.text_encoder={self.text_encoder} needs model.text_encoder_path= a local encoder "
                f"directory, got {self.text_encoder_path}"
            )
        if self.variant == "wan" and self.text_encoder != "learned":
            width = frozen_text_dim(self.text_encoder_path)
            if width != self.text_dim:
                raise ConfigError(
                    f"model.variant=wan takes the frozen encoder's embeddings: model.text_dim={self.text_dim} "
                    f"must be its width {width}"
                )
        self._check_init_from()
        self._check_lora()

    def _check_lora(self) -> None:
        """LoRA settings are in range and have base weights to adapt (raises ConfigError)."""
        lora = self.lora
        if lora.rank < 0 or not 0.0 <= lora.dropout < 1.0 or (lora.alpha is not None and lora.alpha <= 0):
            raise ConfigError(
                f"model.lora needs rank >= 0 (0: off), dropout in [0, 1) and alpha > 0, got rank={lora.rank}, "
                f"dropout={lora.dropout}, alpha={lora.alpha}"
            )
        if lora.enabled and (self.init_from is None or self.text_encoder == "learned"):
            raise ConfigError(
                "model.lora.rank > 0 trains adapters on released weights: it needs model.init_from=DIR and a "
                "frozen text encoder (model.text_encoder=t5 or umt5), whose weights are not trained either"
            )
        if lora.enabled:
            spec = lora_spec(self.variant, lora.rank, lora.alpha, lora.dropout, lora.targets)
            with torch.device("meta"):  # the module names only: no memory, no weights read
                names = matching_modules(build_denoiser(self), spec.targets)
            if not names:
                raise ConfigError(
                    f"model.lora.targets {list(spec.targets)} match no Linear module of the model"
                )

    def _check_init_from(self) -> None:
        """`init_from` is a Wan transformer folder with this architecture (raises ConfigError)."""
        if self.init_from is None:
            return
        if self.variant != "wan":
            raise ConfigError(f"model.init_from needs model.variant=wan, got model.variant={self.variant}")
        # imported here: sora_train.pretrained imports this module
        from .pretrained.loading import PretrainedFormatError, check_architecture

        try:
            check_architecture(self, self.init_from)
        except PretrainedFormatError as error:
            raise ConfigError(f"model.init_from: {error}") from None  # the error names the folder

    def _check_wan_options(self) -> None:
        """The options of `variant=wan` are set only for it, and fit it (raises ConfigError)."""
        wan_only = {"ffn_dim": None, "freq_dim": 256, "cross_attn_norm": True, "norm_eps": 1e-6,
                    "image_dim": None, "added_kv_proj_dim": None, "in_channels": None,
                    "rope_max_seq_len": 1024, "pos_embed_seq_len": None}  # fmt: skip
        if self.variant != "wan":
            changed = [f"model.{n}" for n, default in wan_only.items() if getattr(self, n) != default]
            if changed:
                raise ConfigError(f"{', '.join(changed)} apply only to model.variant=wan")
            return
        if self.absolute_positions or not self.qk_norm or self.rope_axis_dims is not None:
            raise ConfigError(
                "model.variant=wan has fixed positions and norms: it needs model.absolute_positions=false, "
                "model.qk_norm=true and model.rope_axis_dims unset"
            )
        if (self.image_dim is None) != (self.added_kv_proj_dim is None) or self.added_kv_proj_dim not in (
            None, self.hidden_size,
        ):  # fmt: skip
            raise ConfigError(
                "model.image_dim and model.added_kv_proj_dim go together (image-to-video), the latter "
                f"equal to model.hidden_size={self.hidden_size}"
            )
        if self.pos_embed_seq_len is not None and self.image_dim is None:
            raise ConfigError("model.pos_embed_seq_len (first-last-frame models) needs model.image_dim")
        sizes = (self.ffn_dim or 1, self.in_channels or 1, self.rope_max_seq_len, self.freq_dim // 2)
        if min(sizes) < 1 or self.freq_dim % 2 or self.norm_eps <= 0:
            raise ConfigError(
                "model.ffn_dim, model.in_channels and model.rope_max_seq_len must be >= 1, "
                "model.freq_dim even and >= 2, model.norm_eps > 0"
            )


@dataclass
class DataConfig(Section):
    """Where the shards are and how clips are cut from them."""

    name: DataSource = "synthetic"
    train: str = MISSING  # a shard directory (with manifest.json or *.tar), a .tar file, or a brace pattern
    val: str | None = None
    # synthetic corpus only: write it when `train` does not exist or holds an older version of it
    generate_if_missing: bool = False
    num_frames: int = 8
    frame_stride: int = 2
    fps: float = 8.0  # source frame rate; clips play back at fps / frame_stride
    window: ClipWindow = "random"  # where clips are cut from each video
    height: int = 32
    width: int = 32
    num_workers: int = 1  # decode processes per rank; 0 decodes in the training process
    shuffle_buffer: int = 256  # samples shuffled together (after a seeded shard order)
    caption_dropout: float = 0.1
    # A bucket table in configs/buckets or a .yaml path; None: one bucket num_frames × height × width.
    buckets: str | None = None
    tokens_per_batch: int = 0  # per-rank token budget that sizes each bucket's batch; 0: the micro batch size
    target_fps: float | None = None  # sample frames at this rate (stride per video); None: the frame stride
    max_upscale: float = 2.0  # a bucket needing more enlargement than this is not a candidate
    images: str | None = None  # shards of images (key.jpg/png/webp + caption), mixed with the videos
    image_ratio: float = 0.0  # fraction of batches drawn from `images`
    decoder: DecoderName = "auto"  # auto: decord where installed, else torchcodec, else PyAV
    decode_timeout: float = 60.0  # seconds one sample may take to decode before it is skipped
    worker_max_tasks: int = 2000  # samples a decode process handles before it is replaced
    allow_pipe: bool = False  # accept pipe:COMMAND shard sources (they run a shell)
    # Shard indexes and pipe: copies; None: $SORA_CACHE_DIR or ~/.cache/sora_train.
    cache_dir: str | None = None

    def bucket_table(self) -> BucketTable:
        """The buckets clips are trained at: `buckets`, or the one bucket num_frames × height × width
        sampled `frame_stride` frames apart (raises ValueError for a bad table)."""
        return bucket_table(self.buckets, self.num_frames, self.height, self.width, self.frame_stride)

    @property
    def precomputed(self) -> bool:
        """The shards hold latents and text embeddings from `sora-prep encode`: no decoding, no VAE."""
        return self.name == "latents"

    def check(self) -> None:
        """Clip, decoding and mixing settings are in range (raises ConfigError)."""
        if self.images is not None and not 0.0 < self.image_ratio < 1.0:
            raise ConfigError(f"data.images needs 0 < data.image_ratio < 1, got {self.image_ratio}")
        if self.decode_timeout <= 0 or self.max_upscale < 1.0 or self.tokens_per_batch < 0:
            raise ConfigError(
                "data.decode_timeout must be > 0, data.max_upscale >= 1, data.tokens_per_batch >= 0"
            )
        if self.num_workers < 0 or self.frame_stride < 1 or self.num_frames < 1:
            raise ConfigError("data.num_workers must be >= 0, data.frame_stride and data.num_frames >= 1")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"data.caption_dropout must be in [0, 1), got {self.caption_dropout}")


@dataclass
class OptimConfig(Section):
    """AdamW with linear warmup then cosine decay to `min_lr_ratio · lr`."""

    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-8
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1


@dataclass
class DiffusionConfig(Section):
    """Rectified flow with logit-normal timesteps; Euler sampling with classifier-free guidance."""

    timesteps: TimestepSampling = (
        "logit_normal"  # logit_normal (logit_mean, logit_std) | uniform | mode (mode_scale)
    )
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    # Shift timesteps towards noise by sqrt(tokens / shift_base_tokens) for samples with more video
    # tokens than that (longer or larger clips); 0: no shift. 3600 gives Wan's shifts: about 3 at
    # 480p and 4.6 at 720p (81 frames, Wan latents, 1×2×2 patches)
    shift_base_tokens: int = 3600
    loss_weighting: LossWeighting = "none"  # none | cosmap (SD3's cosine-map weight over t)
    # Frame conditioning (needs model.frame_conditioning): probability of each strategy per sample;
    # they must sum to 1, e.g. diffusion.conditioning.none=0.5 diffusion.conditioning.first=0.5
    conditioning: dict[ConditioningStrategy, float] = field(
        default_factory=lambda: {
            "none": 1.0,
            "first": 0.0,
            "first_k": 0.0,
            "last": 0.0,
            "first_last": 0.0,
            "random": 0.0,
        }
    )
    conditioning_first_k: int = 2  # latent frames the first_k strategy keeps clean
    conditioning_random_rate: float = 0.25  # chance each latent frame is kept clean under `random`
    # Train one range of timesteps t (the shifted t the model sees; 1 is noise). Wan 2.2 A14B's experts:
    # high_noise trains t in [expert_boundary, 1], low_noise t in [0, expert_boundary); Wan's boundary
    # is 0.875 for T2V-A14B and 0.9 for I2V-A14B. Without an expert, [t_min, t_max] (default: all).
    # Validation and samples keep to the range (see eval/validation.py and diffusion/sampler.py).
    expert: Expert = "none"  # none | high_noise | low_noise
    expert_boundary: float = 0.875
    t_min: float = 0.0  # only with expert=none
    t_max: float = 1.0  # only with expert=none
    sample_steps: int = 25
    cfg_scale: float = 4.0
    # The shift of the sampling schedule. None: uniform Euler steps from t = 1 to 0. A value samples on
    # diffusers' FlowMatchEulerDiscreteScheduler(shift=sample_shift) schedule, as WanPipeline does:
    # Wan 2.1 uses 5.0 at 720p and 3.0 at 480p; Wan 2.2 A14B 12.0 (T2V) and 5.0 (I2V)
    sample_shift: float | None = None

    def conditions_frames(self) -> bool:
        """Whether training draws conditioned frames at all (some strategy other than none has p > 0)."""
        return any(p > 0 for name, p in self.conditioning.items() if name != "none")

    def check(self) -> None:
        """The timestep shift and the frame-conditioning mix are well formed (raises ConfigError)."""
        if self.shift_base_tokens < 0:
            raise ConfigError(
                f"diffusion.shift_base_tokens must be >= 0 (0: no shift), got {self.shift_base_tokens}"
            )
        unknown = sorted(set(self.conditioning) - set(CONDITIONING_STRATEGIES))
        if unknown:
            raise ConfigError(
                f"diffusion.conditioning has unknown strategies {unknown}; use {', '.join(CONDITIONING_STRATEGIES)}"
            )
        probabilities = self.conditioning.values()
        if any(p < 0 for p in probabilities) or abs(sum(probabilities) - 1.0) > 1e-6:
            raise ConfigError(
                f"diffusion.conditioning probabilities must be >= 0 and sum to 1, got {dict(self.conditioning)}"
            )
        if self.conditioning_first_k < 1 or not 0.0 < self.conditioning_random_rate < 1.0:
            raise ConfigError(
                "diffusion.conditioning_first_k must be >= 1 and diffusion.conditioning_random_rate in (0, 1)"
            )
        self._check_range_and_sampling()

    def _check_range_and_sampling(self) -> None:
        """The expert or free timestep range and the sampling shift are well formed (raises ConfigError)."""
        if not 0.0 < self.expert_boundary < 1.0:
            raise ConfigError(f"diffusion.expert_boundary must be in (0, 1), got {self.expert_boundary}")
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise ConfigError(
                "diffusion.t_min and t_max need 0 <= t_min < t_max <= 1, "
                f"got t_min={self.t_min}, t_max={self.t_max}"
            )
        if self.expert != "none" and (self.t_min, self.t_max) != (0.0, 1.0):
            raise ConfigError(
                f"diffusion.expert={self.expert} sets the timestep range from diffusion.expert_boundary; "
                "leave diffusion.t_min=0 and diffusion.t_max=1"
            )
        low, high = MODE_SCALE_MONOTONE
        restricted = not timestep_range(self).full
        if restricted and self.timesteps == "mode" and not low < self.mode_scale < high:
            raise ConfigError(
                f"diffusion.mode_scale={self.mode_scale} must be in ({low:g}, {high:.3f}) to restrict the "
                "timestep range (the mode density's map is monotone only there)"
            )
        if self.sample_shift is not None and self.sample_shift <= 0:
            raise ConfigError(
                f"diffusion.sample_shift must be > 0 (or null: no shift), got {self.sample_shift}"
            )


@dataclass
class TrainLoopConfig(Section):
    """The loop: length, batch, precision, logging and sampling cadence."""

    max_steps: int = 100
    global_batch_size: int = 8  # samples per optimizer step over all data-parallel ranks
    grad_accum_steps: int = 1
    grad_clip: float = 1.0
    precision: Precision = "auto"  # auto: bf16 on a GPU that supports it, fp32 otherwise; or fp32 / bf16
    # none | full (every block) | every_k (every activation_checkpointing_every-th block) | selective
    # (every block keeps its matmul and attention outputs and recomputes the rest)
    activation_checkpointing: ActivationCheckpointPolicy = "none"
    activation_checkpointing_every: int = 2
    compile_blocks: bool = False  # torch.compile each transformer block
    # SDPA kernel for every attention call, forward and recompute; auto: fastest eligible on the device
    attention_backend: AttentionBackend = "auto"
    ema_decay: float = 0.999
    log_every: int = 10  # console lines; metrics.jsonl gets every step
    sample_every: int = 0  # 0: only at the end
    sample_prompts: list[str] = field(
        default_factory=lambda: [
            "a red square moving right on a black background",
            "a blue circle moving up on a black background",
        ]
    )
    threads_per_rank: int = 0  # torch intra-op threads per process on CPU; 0: cores / local processes
    log_keys: bool = False  # log every step's sample keys to metrics.jsonl (audits the data order)

    def check(self) -> None:
        """The run has steps and a checkpointing stride (raises ConfigError)."""
        if self.max_steps < 1:
            raise ConfigError(f"train.max_steps must be at least 1, got {self.max_steps}")
        if self.activation_checkpointing_every < 1:
            raise ConfigError(
                "train.activation_checkpointing needs train.activation_checkpointing_every >= 1 "
                f"(the k of every_k), got {self.activation_checkpointing_every}"
            )


@dataclass
class CheckpointConfig(Section):
    """How often to save, what to keep, how to verify; checkpoints go to RUN_DIR/checkpoints/step_XXXXXXX."""

    every: int = 100
    save_final: bool = True
    keep_last: int = 3  # complete checkpoints kept (0: all); the newest complete one is never deleted
    keep_every: int = 0  # also keep checkpoints at multiples of this step (0: none)
    verify: CheckpointVerification = "checksum"  # how resume checks files against the manifest (size: faster)
    requeue: bool = False  # on preemption under SLURM, also run `scontrol requeue $SLURM_JOB_ID`
    async_commit: bool = True  # flush, checksum and commit periodic saves on a thread while training goes on
    # checkpoints newer than the one a run resumes from (all of them when it starts over): `keep`
    # moves them to RUN_DIR/checkpoints/abandoned-<time>/, `delete` removes them
    abandoned: AbandonedCheckpoints = "keep"

    def check(self) -> None:
        """Cadence and retention are counts (raises ConfigError)."""
        if self.every < 0:
            raise ConfigError(f"checkpoint.every must be >= 0 (0: no periodic checkpoints), got {self.every}")
        if self.keep_last < 0 or self.keep_every < 0:
            raise ConfigError(
                "checkpoint.keep_last and checkpoint.keep_every must be >= 0 (0: keep all / none)"
            )


@dataclass
class GuardConfig(Section):
    """Training-health guards: non-finite steps are skipped on all ranks; loss spikes are logged."""

    max_consecutive_skips: int = 5  # stop the run after this many skipped steps in a row (0: never)
    spike_zscore: float = 6.0  # a spike: a loss this many running std above the running mean
    spike_warmup: int = 50  # steps of statistics before spikes are flagged

    def check(self) -> None:
        """The guards' counts are >= 0 (raises ConfigError)."""
        if self.max_consecutive_skips < 0 or self.spike_warmup < 0:
            raise ConfigError("guards.max_consecutive_skips and guards.spike_warmup must be >= 0")


@dataclass
class ParallelConfig(Section):
    """Data-parallel sharding with DeepSpeed ZeRO, and Ulysses sequence parallelism.

    ZeRO recipes: configs/parallel/zero1|zero2|zero3|zero3_offload. The ranks form a data-parallel ×
    sequence-parallel grid: `sequence_parallel` consecutive ranks share each sample, each holding a
    slice of its tokens; ZeRO shards over all ranks.
    """

    zero_stage: ZeroStage = 2
    sequence_parallel: int = 1  # ranks per sample (Ulysses); must divide the world size and model.num_heads
    offload_optimizer: bool = False  # optimizer states (and its step) in CPU memory
    offload_params: bool = False  # parameters in CPU memory between uses (ZeRO-3 only)
    overlap_comm: OverlapComm = "auto"  # overlap gradient reduction with the backward pass (auto: on GPU)
    reduce_bucket_size: int = 50_000_000  # elements per gradient reduction
    allgather_bucket_size: int = 50_000_000  # elements per parameter all-gather (ZeRO-1/2)
    prefetch_bucket_size: int = 50_000_000  # elements of parameters fetched ahead (ZeRO-3)
    param_persistence_threshold: int = (
        100_000  # parameters smaller than this stay whole on every rank (ZeRO-3)
    )
    max_live_parameters: int = 1_000_000_000  # gathered parameter elements kept at once (ZeRO-3)
    collective_timeout_s: int = 1800  # a collective not joined by every rank in this long fails the run

    def check(self) -> None:
        """Offloading matches the ZeRO stage (raises ConfigError); the grid is checked against the world
        size by `validate`."""
        if self.collective_timeout_s < 1:
            raise ConfigError(
                f"parallel.collective_timeout_s must be at least 1, got {self.collective_timeout_s}"
            )
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError(
                "parallel.offload_params needs parallel.zero_stage=3 (use parallel=zero3_offload)"
            )


@dataclass
class LaunchConfig(Section):
    """How many local processes `sora-train` starts when it is not already under torchrun."""

    nproc_per_node: int = 1


@dataclass
class WandbConfig(Section):
    """Experiment tracking on rank 0. auto: online when a key is configured, offline otherwise."""

    mode: WandbMode = "auto"
    project: str = "sora_train"
    entity: str | None = None


@dataclass
class EvalConfig(Section):
    """Validation loss on data.val, and the synthetic task's prompt-following evaluation at the end."""

    validate: bool = True  # flow-matching loss on data.val (when set) at the end of training, per bucket
    val_every: int = 0  # also every this many steps (0: only at the end)
    val_batches: int = 0  # batches per rank per validation (0: the whole split)
    val_timesteps: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    synthetic: bool = False  # generate a clip for each held-out clip's caption and score colour and motion
    num_prompts: int = 48  # how many held-out clips' captions (a caption repeats with other noise)
    batch_size: int = 16
    # What evaluating the EMA weights may cost (sora_train/eval/affordable.py); 0: no limit. Below
    # ZeRO-3 validation, samples and eval.synthetic build a whole EMA model in the compute dtype
    # (ZeRO-3 evaluates in the sharded layout, except eval.synthetic): each is skipped when that
    # replica is larger than this many GiB.
    max_replica_gib: float = 8.0
    # Samples are skipped when one round of them costs a rank more compute than this many training steps.
    max_sample_cost_steps: float = 100.0

    def check(self) -> None:
        """Cadence and batch counts are >= 0 and the timesteps inside (0, 1) (raises ConfigError)."""
        if self.val_every < 0 or self.val_batches < 0 or not all(0 < t < 1 for t in self.val_timesteps):
            raise ConfigError(
                "eval.val_every and eval.val_batches must be >= 0, eval.val_timesteps in (0, 1)"
            )
        if self.max_replica_gib < 0 or self.max_sample_cost_steps < 0:
            raise ConfigError(
                "eval.max_replica_gib and eval.max_sample_cost_steps must be >= 0 (0: no limit)"
            )


@dataclass
class TrainConfig:
    """Everything a training run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guards: GuardConfig = field(default_factory=GuardConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run_dir: str = MISSING
    resume: str = "auto"  # auto | never | PATH to a checkpoint directory or a run dir
    seed: int = 0


def register_schema() -> None:
    """Register the schema that configs/train.yaml extends (`omegaconf_schema(TrainConfig)`)."""
    ConfigStore.instance().store(name="train_schema", node=omegaconf_schema(TrainConfig))


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """Resolve a composed DictConfig into a `TrainConfig` (interpolations resolved, types checked)."""
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    typed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(omegaconf_schema(TrainConfig)), cfg))
    return from_schema(TrainConfig, typed)


def to_dictconfig(cfg: TrainConfig) -> DictConfig:
    """`cfg` as a typed DictConfig over the derived schema (what `OmegaConf.structured(cfg)` would be
    if OmegaConf took Literal fields), e.g. for `OmegaConf.to_yaml`."""
    return OmegaConf.structured(to_schema(cfg))


def config_hash(cfg: TrainConfig) -> str:
    """A short digest of the settings that shape training (not where it runs or resumes from)."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("run_dir", "resume")}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def expected_world_size(cfg: TrainConfig) -> int:
    """World size this run will have: torchrun's WORLD_SIZE, or the processes `sora-train` will start."""
    return int(os.environ.get("WORLD_SIZE", cfg.launch.nproc_per_node))


def data_parallel_size(cfg: TrainConfig, world_size: int) -> int:
    """Ranks that see different samples: the world size over the sequence-parallel degree."""
    return world_size // cfg.parallel.sequence_parallel


def validate(cfg: TrainConfig, world_size: int | None = None) -> None:
    """Reject a bad configuration with one clear line (raises ConfigError): each section's options
    and own rules, then the rules that span sections, the world size and the file system."""
    for f in fields(cfg):
        section = getattr(cfg, f.name)
        if isinstance(section, Section):
            try:
                check_options(section, f.name)
            except OptionError as error:
                raise ConfigError(str(error)) from None
            section.check()
    cross_section_rules(cfg, world_size or expected_world_size(cfg))


def cross_section_rules(cfg: TrainConfig, world_size: int) -> None:
    """The rules that involve two sections, the world size or the file system (raises ConfigError)."""
    _rank_grid_rules(cfg, world_size)
    _clip_shape_rules(cfg)
    if cfg.diffusion.conditions_frames() and not cfg.model.frame_conditioning:
        raise ConfigError(
            "diffusion.conditioning draws conditioned frames; it needs model.frame_conditioning=true"
        )
    _path_rules(cfg)


def _rank_grid_rules(cfg: TrainConfig, world_size: int) -> None:
    """Sequence parallelism divides the world and the heads; the global batch divides over the
    data-parallel ranks and accumulation steps."""
    model, train, sp = cfg.model, cfg.train, cfg.parallel.sequence_parallel
    if sp < 1 or world_size % sp:
        raise ConfigError(
            f"parallel.sequence_parallel={sp} must be >= 1 and divide the world size ({world_size} ranks)"
        )
    if model.num_heads % sp:
        raise ConfigError(
            f"parallel.sequence_parallel={sp} must divide model.num_heads={model.num_heads}: "
            "Ulysses attention gives each rank whole heads"
        )
    per_step = world_size // sp * train.grad_accum_steps
    if train.global_batch_size < per_step or train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} does not divide across {world_size // sp} "
            f"data-parallel ranks × {train.grad_accum_steps} accumulation steps; use a multiple of {per_step}"
        )


def _clip_shape_rules(cfg: TrainConfig) -> None:
    """In pixel space the clip sides and every bucket divide by the patch size; mixed-in images need
    1-frame buckets."""
    model, data = cfg.model, cfg.data
    pixels = model.latent_space == "pixel"
    sides = {"data.num_frames": data.num_frames, "data.height": data.height, "data.width": data.width}
    for (name, side), patch in zip(sides.items(), model.patch_size, strict=True):
        if pixels and side % patch:
            raise ConfigError(f"{name}={side} is not divisible by the patch size {patch} (model.patch_size)")
    try:
        table = data.bucket_table()
    except ValueError as error:
        raise ConfigError(f"data.buckets: {error}") from error
    try:
        check_bucket_table(table, model.patch_size if pixels else None, images=data.images is not None)
    except ValueError as error:
        raise ConfigError(str(error)) from error


def _path_rules(cfg: TrainConfig) -> None:
    """The checkpoint to resume from exists, and so do the data (unless the synthetic corpus is
    written on first use)."""
    data = cfg.data
    if cfg.resume not in ("auto", "never") and not Path(cfg.resume).exists():
        raise ConfigError(f"resume={cfg.resume}: no such checkpoint")
    if not (data.generate_if_missing and data.name == "synthetic"):
        for split in ("train", "val", "images"):
            path = getattr(data, split)
            if path is not None and not _shard_source_exists(path):
                raise ConfigError(f"data.{split}={path}: no such file or directory")


def _holds_config_json(directory: str | None) -> bool:
    """Whether `directory` is set and holds a config.json (a local pretrained model)."""
    return bool(directory) and (Path(directory) / "config.json").is_file()


def _shard_source_exists(source: str) -> bool:
    """A shard source exists when its path (or, for a brace pattern, its directory) does.

    Object-store URLs and pipe: commands are checked when the loader resolves them.
    """
    if "://" in source or source.startswith("pipe:"):
        return True
    if "{" in source:
        return Path(source.split("{", 1)[0]).parent.exists()
    return Path(source).exists()
