"""The model, objective and memory options: each bad combination is refused with one clear line."""

from __future__ import annotations

import pytest

from sora_train.config import ConfigError, validate
from sora_train.planning.cli import compose_config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.variant=unet"], "model.variant must be cross_attention or mmdit, got 'unet'"),
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
