"""Training one range of timesteps (Wan 2.2's experts, or a free [t_min, t_max]): the draws stay in
the range and keep the distribution's shape there, the full range draws exactly what it always did,
and validation and sampling keep to the range."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sora_train.config import ConfigError, DiffusionConfig, ModelConfig, validate
from sora_train.diffusion.flow import interpolate, velocity_target
from sora_train.diffusion.sampler import euler_sample, sample_times
from sora_train.diffusion.timesteps import TimestepRange, timestep_range, training_timesteps
from sora_train.eval.validation import loss_sums, validation_timesteps
from sora_train.generate import generate_videos, initial_noise
from sora_train.models.denoiser import build_denoiser
from sora_train.models.prompts import PromptEncoder
from sora_train.planning.cli import compose_config

SAMPLERS = ("logit_normal", "uniform", "mode")
SHIFTS = ((0, 1024), (3600, 75_600))  # (shift_base_tokens, tokens): no shift; Wan 720p's sqrt(21)
RANGES = (
    {"expert": "high_noise"},
    {"expert": "high_noise", "expert_boundary": 0.9},
    {"expert": "low_noise"},
    {"t_min": 0.2, "t_max": 0.6},
    {"t_min": 0.0, "t_max": 0.3},
    {"t_min": 0.95, "t_max": 1.0},
)


def config(sampler: str, base: int, **range_fields) -> DiffusionConfig:
    return DiffusionConfig(timesteps=sampler, shift_base_tokens=base, logit_mean=0.3, **range_fields)


def in_range(t: torch.Tensor, t_range: TimestepRange) -> torch.Tensor:
    """Elementwise membership, compared in t's dtype (as the range is defined)."""
    below_top = t < t_range.high if t_range.open_high else t <= t_range.high
    return (t >= t_range.low) & below_top


# --- the draws ---


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize(("base", "tokens"), SHIFTS)
@pytest.mark.parametrize("range_fields", RANGES, ids=str)
def test_draws_stay_in_the_range(sampler, base, tokens, range_fields):
    cfg = config(sampler, base, **range_fields)
    t = training_timesteps(50_000, tokens, torch.Generator().manual_seed(1), cfg)
    assert t.dtype == torch.float32 and t.shape == (50_000,)
    assert in_range(t, timestep_range(cfg)).all()
    assert t.unique().numel() > 40_000  # a density, not a few clamped values


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    values = torch.cat([a, b]).sort().values
    cdf_a = torch.searchsorted(a.sort().values, values, right=True) / a.numel()
    cdf_b = torch.searchsorted(b.sort().values, values, right=True) / b.numel()
    return (cdf_a - cdf_b).abs().max().item()


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize(("base", "tokens"), SHIFTS)
@pytest.mark.parametrize("range_fields", RANGES, ids=str)
def test_the_density_inside_the_range_keeps_its_shape(sampler, base, tokens, range_fields):
    """The restricted draws against the unrestricted draws (another seed) that fall in the range:
    a two-sample KS test at the 0.1% level, and equal histograms within 4 standard errors per bin."""
    cfg = config(sampler, base, **range_fields)
    t_range = timestep_range(cfg)
    restricted = training_timesteps(20_000, tokens, torch.Generator().manual_seed(2), cfg)
    everything = training_timesteps(
        2_000_000, tokens, torch.Generator().manual_seed(3), config(sampler, base)
    )
    reference = everything[in_range(everything, t_range)]
    assert reference.numel() > 5_000
    n, m = restricted.numel(), reference.numel()
    assert ks_statistic(restricted, reference) < 1.95 * ((n + m) / (n * m)) ** 0.5
    edges = torch.linspace(t_range.low, t_range.high, 11)
    share = lambda t: torch.histogram(t.clamp(max=t_range.high), edges).hist / t.numel()  # noqa: E731
    p, q = share(restricted), share(reference)
    assert ((p - q).abs() <= 4 * (q * (1 - q) / n).sqrt() + 1e-3).all()


# Captured from `training_timesteps` before the range existed (seed 7, 12 draws): the full range
# must keep drawing exactly these (the demo's figures and exact resumes depend on them).
BEFORE = {
    ("logit_normal", 0.0, 1024): [
        0.4633669853210449, 0.6870021820068359, 0.7204755544662476, 0.24706192314624786,
        0.8443281054496765, 0.29011452198028564, 0.4120190441608429, 0.7742358446121216,
        0.534488320350647, 0.15680457651615143, 0.5787583589553833, 0.5331530570983887,
    ],
    ("logit_normal", 1.0, 75_600): [
        0.9149371981620789, 0.9647158980369568, 0.9697951674461365, 0.8034372329711914,
        0.9854148626327515, 0.8358176946640015, 0.8972131609916687, 0.9771267771720886,
        0.9346511960029602, 0.6984784603118896, 0.9447963237762451, 0.9343226552009583,
    ],
    ("uniform", 0.0, 1024): [
        0.5349225401878357, 0.19880318641662598, 0.6592116951942444, 0.6568902730941772,
        0.23276156187057495, 0.4250614047050476, 0.20708602666854858, 0.6297363638877869,
        0.36531615257263184, 0.8512683510780334, 0.8549431562423706, 0.5509352087974548,
    ],
    ("uniform", 0.0, 75_600): [
        0.8405303359031677, 0.5320733785629272, 0.8986254334449768, 0.8976817727088928,
        0.5816324353218079, 0.7721042633056641, 0.5447997450828552, 0.8862854242324829,
        0.7250990271568298, 0.9632737636566162, 0.9642972350120544, 0.8489912152290344,
    ],
    ("mode", 0.0, 1024): [
        0.4906499981880188, 0.6665029525756836, 0.444735586643219, 0.44591572880744934,
        0.6318731307983398, 0.5211580991744995, 0.6575254201889038, 0.4585737884044647,
        0.5435832142829895, 0.2714569866657257, 0.26635733246803284, 0.48612990975379944,
    ],
    ("mode", 0.0, 20_000): [
        0.6942351460456848, 0.8248862028121948, 0.6537206768989563, 0.6548013687133789,
        0.8018122911453247, 0.7195199728012085, 0.8190144896507263, 0.6662590503692627,
        0.7373374104499817, 0.4675845801830292, 0.4611325263977051, 0.6903817653656006,
    ],
}  # fmt: skip


@pytest.mark.parametrize(("sampler", "mean", "tokens"), list(BEFORE), ids=str)
def test_the_full_range_draws_exactly_what_it_drew_before(sampler, mean, tokens):
    generator = torch.Generator().manual_seed(7)
    t = training_timesteps(12, tokens, generator, DiffusionConfig(timesteps=sampler, logit_mean=mean))
    assert torch.equal(t, torch.tensor(BEFORE[sampler, mean, tokens], dtype=torch.float32))
    explicit = DiffusionConfig(timesteps=sampler, logit_mean=mean, expert="none", t_min=0.0, t_max=1.0)
    assert torch.equal(training_timesteps(12, tokens, torch.Generator().manual_seed(7), explicit), t)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("range_fields", RANGES, ids=str)
def test_a_range_makes_the_same_generator_draws_deterministically(sampler, range_fields):
    """The same seed gives the same draws; the generator advances exactly as without a range, so
    what is drawn after the timesteps (noise, masks) and an exact resume are unchanged."""
    cfg = config(sampler, 3600, **range_fields)
    full, restricted = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    training_timesteps(64, 75_600, full, config(sampler, 3600))
    first = training_timesteps(64, 75_600, restricted, cfg)
    assert torch.equal(full.get_state(), restricted.get_state())
    assert torch.equal(first, training_timesteps(64, 75_600, torch.Generator().manual_seed(4), cfg))


def test_the_full_ranges_conditional_path_is_the_plain_sampler():
    """The inverse-CDF path with the whole [0, 1] reproduces the plain draws (to float rounding):
    the quantile mapping is the sampler itself when nothing is cut."""
    from sora_train.diffusion.timesteps import restricted_timesteps

    for sampler in SAMPLERS:
        cfg = config(sampler, 3600)
        plain = training_timesteps(4096, 75_600, torch.Generator().manual_seed(5), cfg)
        mapped = restricted_timesteps(4096, torch.Generator().manual_seed(5), cfg, TimestepRange(), 21**0.5)
        torch.testing.assert_close(mapped, plain, rtol=0, atol=2e-6)


# --- settings ---


def test_expert_is_typed_by_its_owning_module():
    from typing import get_type_hints

    from sora_train.diffusion.timesteps import Expert

    assert get_type_hints(DiffusionConfig)["expert"] is Expert


def test_the_experts_ranges():
    assert timestep_range(DiffusionConfig(expert="high_noise")) == TimestepRange(0.875, 1.0)
    assert timestep_range(DiffusionConfig(expert="low_noise", expert_boundary=0.9)) == TimestepRange(
        0.0, 0.9, True
    )
    assert timestep_range(DiffusionConfig(t_min=0.1, t_max=0.4)) == TimestepRange(0.1, 0.4)
    assert timestep_range(DiffusionConfig()).full
    low = TimestepRange(0.0, 0.875, open_high=True)
    assert low.contains(0.0) and not low.contains(0.875)
    assert low.clamp(torch.tensor([0.875, 1.0])).max() < 0.875


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["diffusion.expert=middle"], "diffusion.expert must be none, high_noise or low_noise, got 'middle'"),
        (["diffusion.expert_boundary=1.0"], "diffusion.expert_boundary must be in (0, 1), got 1.0"),
        (["diffusion.expert_boundary=0"], "diffusion.expert_boundary must be in (0, 1), got 0"),
        (
            ["diffusion.t_min=0.5", "diffusion.t_max=0.5"],
            "need 0 <= t_min < t_max <= 1, got t_min=0.5, t_max=0.5",
        ),
        (["diffusion.t_min=-0.1"], "need 0 <= t_min < t_max <= 1"),
        (["diffusion.t_max=1.5"], "need 0 <= t_min < t_max <= 1"),
        (
            ["diffusion.expert=low_noise", "diffusion.t_max=0.5"],
            "diffusion.expert=low_noise sets the timestep range from diffusion.expert_boundary; "
            "leave diffusion.t_min=0 and diffusion.t_max=1",
        ),
        (
            ["diffusion.expert=high_noise", "diffusion.t_min=0.9"],
            "leave diffusion.t_min=0 and diffusion.t_max=1",
        ),
        (
            ["diffusion.timesteps=mode", "diffusion.mode_scale=2.0", "diffusion.expert=high_noise"],
            "diffusion.mode_scale=2.0 must be in (-1, 1.752) to restrict the timestep range",
        ),
        (["diffusion.sample_shift=0"], "diffusion.sample_shift must be > 0 (or null: no shift), got 0"),
    ],
)
def test_bad_range_settings_are_one_clear_line(overrides, message):
    with pytest.raises(ConfigError) as error:
        validate(compose_config(["run_dir=unused", *overrides]), world_size=1)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["diffusion.expert=high_noise"],
        ["diffusion.expert=low_noise", "diffusion.expert_boundary=0.9", "diffusion.sample_shift=5.0"],
        ["diffusion.t_min=0.25", "diffusion.t_max=0.75", "diffusion.timesteps=mode"],
        ["diffusion.timesteps=mode", "diffusion.mode_scale=2.0"],  # the full range needs no monotone map
    ],
)
def test_good_range_settings_pass(overrides):
    validate(compose_config(["run_dir=unused", *overrides]), world_size=1)


# --- validation ---


def test_validation_keeps_the_timesteps_inside_the_range():
    configured = [0.1, 0.3, 0.5, 0.7, 0.9]
    assert validation_timesteps(configured) == configured
    assert validation_timesteps(configured, timestep_range(DiffusionConfig(expert="high_noise"))) == [0.9]
    assert validation_timesteps(configured, timestep_range(DiffusionConfig(expert="low_noise"))) == [
        0.1,
        0.3,
        0.5,
        0.7,
    ]
    assert validation_timesteps([0.1, 0.875], TimestepRange(0.0, 0.875, True)) == [0.1]
    assert validation_timesteps([0.1, 0.875], TimestepRange(0.875, 1.0)) == [0.875]
    # none inside: the centres of as many equal parts of the range
    centres = validation_timesteps(configured, TimestepRange(0.92, 0.97))
    assert centres == pytest.approx([0.925, 0.935, 0.945, 0.955, 0.965])
    assert validation_timesteps([0.5], TimestepRange(0.9, 1.0)) == pytest.approx([0.95])


class RecordingModel(torch.nn.Module):
    """Predicts zeros and records every timestep it is called with."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[float] = []

    def forward(self, x, t, text, mask):
        self.seen += t.tolist()
        return torch.zeros_like(x)


def test_the_validation_loss_runs_only_inside_the_range():
    cfg = ModelConfig(preset="test", text_vocab_size=256)
    batch = {"x": torch.randn(2, 4, 2, 4, 4), "caption": ["a", "b"], "key": ["k0", "k1"], "bucket": "b"}
    model = RecordingModel()
    low = timestep_range(DiffusionConfig(expert="low_noise"))
    sums = loss_sums(model, [batch], PromptEncoder(cfg), None, [0.1, 0.5, 0.9], 0, torch.float32, low)
    assert sorted(set(model.seen)) == pytest.approx([0.1, 0.5]) and sums["b"][1] == 2
    model.seen.clear()
    loss_sums(model, [batch], PromptEncoder(cfg), None, [0.1, 0.5, 0.9], 0, torch.float32)
    assert sorted(set(model.seen)) == pytest.approx([0.1, 0.5, 0.9])


# --- sampling ---


def recorded(velocity):
    """`velocity` that records (x, t) of each conditional call."""
    calls = []

    def record(x, t, conditional):
        if conditional:
            calls.append((x.clone(), t.clone()))
        return velocity(x, t, conditional)

    return record, calls


def test_the_high_noise_expert_samples_down_to_the_boundary_and_returns_its_clean_estimate():
    x0, noise = torch.randn(2, 3, 2, 4, 4), torch.randn(2, 3, 2, 4, 4)
    t_range = timestep_range(DiffusionConfig(expert="high_noise"))
    velocity, calls = recorded(lambda x, t, conditional: velocity_target(x0, noise))
    sample = euler_sample(velocity, noise, steps=8, cfg_scale=2.0, shift=5.0, t_range=t_range)
    times = torch.stack([t[0] for _, t in calls])
    assert times[0] == 1.0 and times[-1] == 0.875 and (times >= 0.875).all()
    torch.testing.assert_close(
        calls[-1][0], interpolate(x0, noise, torch.full((2,), 0.875))
    )  # x at the boundary
    torch.testing.assert_close(sample, x0)  # x̂0 = x_b - b·v, with the true velocity exactly x0


def test_the_low_noise_expert_starts_from_a_reference_renoised_at_the_boundary():
    x0, noise = torch.randn(2, 3, 2, 4, 4), torch.randn(2, 3, 2, 4, 4)
    t_range = timestep_range(DiffusionConfig(expert="low_noise"))
    velocity, calls = recorded(lambda x, t, conditional: velocity_target(x0, noise))
    sample = euler_sample(velocity, noise, steps=8, shift=5.0, t_range=t_range, reference=x0[:1])
    times = torch.stack([t[0] for _, t in calls])
    assert (times < 0.875).all() and times[0] > 0.87499 and times[-1] > 0
    reference = x0[:1].expand_as(x0)
    torch.testing.assert_close(calls[0][0], interpolate(reference, noise, times[:1].expand(2)))
    # the true velocity of (x0[0], noise) carries the start exactly onto x0[0]
    torch.testing.assert_close(
        euler_sample(lambda x, t, c: velocity_target(reference, noise), noise, 8, shift=5.0, t_range=t_range,
                     reference=x0[:1]),
        reference,
    )  # fmt: skip
    assert sample.shape == x0.shape
    velocity, zero_calls = recorded(lambda x, t, conditional: torch.zeros_like(x))
    euler_sample(velocity, noise, 8, t_range=t_range)  # no reference: zero latents re-noised
    torch.testing.assert_close(zero_calls[0][0], zero_calls[0][1][0] * noise)


def test_without_a_range_sampling_is_what_it_was():
    """Captured from `euler_sample` before ranges and shifts existed: a nonlinear velocity with CFG."""

    def velocity(x, t, conditional):
        return torch.sin(3 * x + t[:, None]) * (1.0 if conditional else 0.5) - x * t[:, None]

    noise = torch.randn(2, 3, generator=torch.Generator().manual_seed(5))
    before = {
        (7, 1.0): [-0.16097387671470642, -0.17784032225608826, -0.17022407054901123, 1.3701083660125732,
                   -0.1372091919183731, 2.3284354209899902],
        (5, 3.5): [-0.05151829868555069, -0.051535263657569885, -0.051524192094802856, 0.585258960723877,
                   -0.051550932228565216, 2.0908498764038086],
    }  # fmt: skip
    for (steps, cfg_scale), values in before.items():
        expected = torch.tensor(values).reshape(2, 3)
        assert torch.equal(euler_sample(velocity, noise, steps, cfg_scale), expected)
        assert torch.equal(euler_sample(velocity, noise, steps, cfg_scale, t_range=TimestepRange()), expected)
    assert torch.equal(sample_times(25), torch.linspace(1.0, 0.0, 26))


def test_a_free_range_samples_its_share_of_the_schedule():
    assert sample_times(4, None, TimestepRange(0.2, 0.6)).tolist() == pytest.approx([0.6, 0.5, 0.25, 0.2])
    low = sample_times(10, 5.0, TimestepRange(0.0, 0.875, True))
    high = sample_times(10, 5.0, TimestepRange(0.875, 1.0))
    whole = sample_times(10, 5.0)
    # the two experts' schedules are the whole schedule with the boundary added between them
    assert torch.equal(torch.cat([high, low[1:]]), torch.cat([whole[:4], torch.tensor([0.875]), whole[4:]]))


def tiny_model():
    cfg = ModelConfig(preset="test", hidden_size=32, depth=1, num_heads=2, patch_size=[1, 4, 4], text_dim=32,
                      text_depth=1, text_heads=2, text_vocab_size=256)  # fmt: skip
    torch.manual_seed(0)
    model = build_denoiser(cfg).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.1)
    return model, cfg


def test_with_a_seed_per_prompt_a_clip_does_not_depend_on_its_batch():
    model, cfg = tiny_model()
    sampling = DiffusionConfig(sample_steps=3, cfg_scale=2.0)
    batch = generate_videos(model, cfg, ["a", "b", "c"], (5, 16, 16), sampling, seed=[7, 8, 9])
    alone = generate_videos(model, cfg, ["b"], (5, 16, 16), sampling, seed=8)  # a batch of one
    np.testing.assert_array_equal(batch[1], alone[0])
    assert not np.array_equal(batch[1], generate_videos(model, cfg, ["a", "b"], (5, 16, 16), sampling, 8)[1])
    with pytest.raises(ValueError, match="2 seeds for a batch of 3"):
        initial_noise((3, 4), [1, 2])


@pytest.mark.parametrize("expert", ["none", "high_noise", "low_noise"])
def test_generate_videos_samples_each_expert(expert):
    model, cfg = tiny_model()
    sampling = DiffusionConfig(sample_steps=4, cfg_scale=2.0, expert=expert, sample_shift=3.0)
    clips = generate_videos(model, cfg, ["a", "b"], (5, 16, 16), sampling, seed=1)
    assert clips.shape == (2, 5, 16, 16, 3) and clips.dtype == np.uint8
    assert np.array_equal(clips, generate_videos(model, cfg, ["a", "b"], (5, 16, 16), sampling, seed=1))
    if (
        expert == "low_noise"
    ):  # a bright reference clip (re-noised to t = 0.875 keeps 1/8 of it) lifts the clips
        bright = torch.full((1, 3, 5, 16, 16), 0.8)
        lit = generate_videos(model, cfg, ["a", "b"], (5, 16, 16), sampling, seed=1, reference=bright)
        assert lit.mean() > clips.mean() + 5
