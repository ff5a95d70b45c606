"""The options: each bad value or combination is refused with one clear line; option types are
declared once, by the modules that own them, and checked generically."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass, is_dataclass, replace
from types import UnionType
from typing import Literal, Union, get_args, get_origin, get_type_hints

import pytest

from sora_train.config import (
    ConfigError,
    DataConfig,
    DiffusionConfig,
    ModelConfig,
    TrainConfig,
    TrainLoopConfig,
    config_hash,
    to_dictconfig,
    to_train_config,
    validate,
)
from sora_train.data.decode import ClipWindow
from sora_train.diffusion.conditioning import CONDITIONING_STRATEGIES, ConditioningStrategy
from sora_train.diffusion.flow import LOSS_WEIGHTINGS, LossWeighting
from sora_train.diffusion.timesteps import TimestepSampling
from sora_train.models.denoiser import ModelVariant
from sora_train.models.text_encoders import TEXT_ENCODERS, TextEncoderName
from sora_train.models.vae import LATENT_SPACES, LatentSpaceName
from sora_train.options import OptionError, check_options
from sora_train.parallel.checkpointing import POLICIES, ActivationCheckpointPolicy
from sora_train.planning.cli import compose_config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.variant=unet"], "model.variant must be cross_attention, mmdit or wan, got 'unet'"),
        (["model.text_depth=0"], "model.text_depth and model.text_heads must be >= 1, got 0 and"),
        (["model.text_heads=0"], "model.text_depth and model.text_heads must be >= 1, got 2 and 0"),
        (
            ["model.variant=mmdit", "model.shared_modulation=true"],
            "model.shared_modulation is for model.variant=cross",
        ),
        (
            ["model.single_stream_blocks=2"],
            "model.single_stream_blocks=2 must be in [0, model.depth] and needs",
        ),
        (
            ["model.variant=mmdit", "model.single_stream_blocks=5"],
            "model.single_stream_blocks=5 must be in [0, ",
        ),
        (
            ["train.activation_checkpointing=true"],
            "train.activation_checkpointing must be none, full, every_k or",
        ),
        (["train.activation_checkpointing_every=0"], "train.activation_checkpointing_every >= 1"),
        (["diffusion.loss_weighting=snr"], "diffusion.loss_weighting must be none or cosmap, got 'snr'"),
        (["+diffusion.conditioning.middle=0.5"], "diffusion.conditioning has unknown strategies ['middle']"),
        (["diffusion.conditioning.none=0.5"], "probabilities must be >= 0 and sum to 1"),
        (
            ["diffusion.conditioning.none=0.5", "diffusion.conditioning.first=0.5"],
            "it needs model.frame_conditioning",
        ),
        (["diffusion.conditioning_random_rate=1.0"], "diffusion.conditioning_random_rate in (0, 1)"),
    ],
)
def test_bad_option_is_one_clear_line(overrides, message):
    cfg = compose_config(["run_dir=unused", *overrides])
    with pytest.raises(ConfigError) as error:
        validate(cfg, world_size=1)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.variant=mmdit", "model.single_stream_blocks=4"],  # all four of tiny's blocks single-stream
        ["train.activation_checkpointing=every_k", "train.compile_blocks=true"],
        [
            "model.frame_conditioning=true",
            "diffusion.conditioning.none=0.4",
            "diffusion.conditioning.first=0.3",
            "diffusion.conditioning.first_last=0.3",
        ],
        ["diffusion.loss_weighting=cosmap", "diffusion.shift_base_tokens=0"],
    ],
)
def test_good_options_pass(overrides):
    validate(compose_config(["run_dir=unused", *overrides]), world_size=1)


@pytest.mark.parametrize("given, option", [("true", "true"), ("false", "false"), ("auto", "auto")])
def test_a_yaml_boolean_given_to_a_true_false_option_means_that_option(given, option):
    cfg = compose_config(["run_dir=unused", f"parallel.overlap_comm={given}"])  # YAML parses true as a bool
    validate(cfg, world_size=1)
    assert cfg.parallel.overlap_comm == option


def option_fields() -> list[tuple[str, str, tuple]]:
    """(section, field, options) of every Literal-typed field (or `Literal[...] | None`) of every
    TrainConfig section."""
    found = []
    for section, section_type in get_type_hints(TrainConfig).items():
        if not is_dataclass(section_type):
            continue
        for name, annotation in get_type_hints(section_type).items():
            members = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
            found += [(section, name, get_args(m)) for m in members if get_origin(m) is Literal]
    return found


def spoken(options: tuple) -> str:
    words = [str(option) for option in options]
    return f"{', '.join(words[:-1])} or {words[-1]}"


def test_the_options_are_found():
    names = {f"{section}.{name}" for section, name, _ in option_fields()}
    assert {"model.variant", "train.activation_checkpointing", "parallel.zero_stage", "wandb.mode"} <= names
    assert len(names) >= 13


@pytest.mark.parametrize(("section", "name", "options"), option_fields(), ids=lambda v: str(v))
def test_every_option_rejects_a_bad_value_with_one_generic_line(section, name, options):
    bad = max(options) + 1 if isinstance(options[0], int) else "not_an_option"
    cfg = compose_config(["run_dir=unused", f"{section}.{name}={bad}"])
    with pytest.raises(ConfigError) as error:
        validate(cfg, world_size=1)
    assert str(error.value) == f"{section}.{name} must be {spoken(options)}, got {bad!r}"


@pytest.mark.parametrize(("section", "name", "options"), option_fields(), ids=lambda v: str(v))
def test_every_declared_option_passes_the_option_check(section, name, options):
    default = getattr(TrainConfig(), section)
    for option in options:
        check_options(replace(default, **{name: option}), section)


@dataclass
class OptionalChoice:
    choice: Literal["a", "b"] | None = None


def test_an_optional_option_accepts_none_and_its_options_only():
    check_options(OptionalChoice(), "section")
    check_options(OptionalChoice("b"), "section")
    with pytest.raises(OptionError, match=r"^section\.choice must be a, b or None, got 'c'$"):
        check_options(OptionalChoice("c"), "section")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_steps=abc", "train.max_steps"),
        ("parallel.zero_stage=abc", "parallel.zero_stage"),  # an int option is still typed as an int
        ("train.no_such_key=1", "unknown config key 'train.no_such_key'"),
        ("model.no_such_key=x", "unknown config key 'model.no_such_key'"),
    ],
)
def test_unknown_keys_and_wrong_types_fail_at_composition(override, message):
    with pytest.raises(ConfigError) as error:
        compose_config(["run_dir=unused", override])
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_options_stay_plain_values_through_every_round_trip():
    cfg = compose_config(["run_dir=unused", "train.activation_checkpointing=selective", "parallel=zero3"])
    assert type(cfg.train.activation_checkpointing) is str and type(cfg.parallel.zero_stage) is int
    again = to_train_config(to_dictconfig(cfg))
    assert again == cfg and asdict(again) == asdict(cfg) and config_hash(again) == config_hash(cfg)
    assert json.loads(json.dumps(asdict(cfg))) == asdict(cfg)


@pytest.mark.parametrize(
    ("recipe", "precomputed"), [("latents", True), ("synthetic", False), ("shards", False)]
)
def test_precomputed_means_the_latents_recipe(recipe, precomputed):
    cfg = compose_config(["run_dir=unused", f"data={recipe}", "data.train=unused"])
    assert cfg.data.precomputed is precomputed


@pytest.mark.parametrize(
    ("section_type", "name", "alias"),
    [
        (ModelConfig, "variant", ModelVariant),
        (ModelConfig, "latent_space", LatentSpaceName),
        (ModelConfig, "text_encoder", TextEncoderName),
        (DataConfig, "window", ClipWindow),
        (DiffusionConfig, "timesteps", TimestepSampling),
        (DiffusionConfig, "loss_weighting", LossWeighting),
        (TrainLoopConfig, "activation_checkpointing", ActivationCheckpointPolicy),
    ],
)
def test_options_are_the_owning_modules_types(section_type, name, alias):
    annotation = get_type_hints(section_type)[name]
    assert annotation is alias and get_args(annotation) == get_args(alias)


def test_option_lists_derive_from_their_types():
    assert get_args(ActivationCheckpointPolicy) == POLICIES
    assert get_args(LossWeighting) == LOSS_WEIGHTINGS
    assert get_args(LatentSpaceName) == LATENT_SPACES
    assert set(TEXT_ENCODERS) < set(get_args(TextEncoderName))
    assert get_args(ConditioningStrategy) == CONDITIONING_STRATEGIES
    key_type, _ = get_args(get_type_hints(DiffusionConfig)["conditioning"])
    assert key_type is ConditioningStrategy


def test_config_imports_neither_deepspeed_nor_diffusers():
    code = "import sys, sora_train.config; print(sorted({'deepspeed', 'diffusers', 'transformers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
