"""Rectified flow: interpolation, target, timesteps, and the Euler sampler with CFG."""

from __future__ import annotations

import torch

from sora_train.diffusion.flow import flow_loss, interpolate, sample_timesteps, velocity_target
from sora_train.diffusion.sampler import euler_sample


def test_interpolation_endpoints_and_target():
    x0, noise = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    assert torch.equal(interpolate(x0, noise, torch.zeros(3)), x0)
    assert torch.equal(interpolate(x0, noise, torch.ones(3)), noise)
    t = torch.tensor([0.1, 0.5, 0.9])
    eps = 1e-3
    derivative = (interpolate(x0, noise, t + eps) - interpolate(x0, noise, t - eps)) / (2 * eps)
    torch.testing.assert_close(derivative, velocity_target(x0, noise), rtol=1e-2, atol=1e-2)


def test_logit_normal_timesteps():
    t = sample_timesteps(20000, torch.Generator().manual_seed(0), mean=0.0, std=1.0)
    assert t.min() > 0 and t.max() < 1
    assert abs(t.median().item() - 0.5) < 0.02
    shifted = sample_timesteps(20000, torch.Generator().manual_seed(0), mean=1.0, std=1.0)
    assert shifted.median() > 0.7  # mean 1 puts more mass on noisier timesteps


def test_exact_velocity_gives_zero_loss_and_exact_samples():
    x0, noise = torch.randn(2, 3, 2, 4, 4), torch.randn(2, 3, 2, 4, 4)
    true_velocity = velocity_target(x0, noise)
    t = torch.rand(2)
    assert flow_loss(lambda x_t, t_: true_velocity, x0, noise, t).item() == 0.0
    # Straight paths: Euler integration of the true velocity lands exactly on the data.
    sample = euler_sample(lambda x, t_, conditional: true_velocity, noise, steps=3)
    torch.testing.assert_close(sample, x0)


def test_classifier_free_guidance_extrapolates():
    noise = torch.zeros(1, 1)

    def velocity(x, t, conditional):
        return torch.full_like(x, -1.0 if conditional else -0.5)

    # v = v_u + s (v_c - v_u) = -0.5 + 3 (-0.5) = -2; x_0 = x_1 - 1 · v = 2
    assert euler_sample(velocity, noise, steps=4, cfg_scale=3.0).item() == 2.0
    assert euler_sample(velocity, noise, steps=4, cfg_scale=1.0).item() == 1.0


def test_uniform_and_mode_timesteps():
    from sora_train.diffusion.flow import mode_timesteps, uniform_timesteps

    uniform = uniform_timesteps(20000, torch.Generator().manual_seed(0))
    assert abs(uniform.mean().item() - 0.5) < 0.01
    mode = mode_timesteps(20000, torch.Generator().manual_seed(0), scale=1.29)
    assert mode.min() >= 0 and mode.max() <= 1
    middle = lambda t: ((t > 0.25) & (t < 0.75)).float().mean().item()  # noqa: E731
    assert middle(mode) > middle(uniform) + 0.1  # a positive scale concentrates on the middle
    assert torch.allclose(mode_timesteps(8, torch.Generator().manual_seed(1), scale=0.0),
                          1 - uniform_timesteps(8, torch.Generator().manual_seed(1)))  # fmt: skip


def test_more_tokens_get_noisier_timesteps():
    from sora_train.config import DiffusionConfig
    from sora_train.diffusion.flow import resolution_shift, shift_timesteps
    from sora_train.diffusion.timesteps import training_timesteps

    t = torch.linspace(0.01, 0.99, 99)
    assert torch.equal(shift_timesteps(t, 1.0), t)
    assert (shift_timesteps(t, 3.0) > t).all() and (shift_timesteps(t, 3.0) < 1).all()
    assert resolution_shift(1024, 4096) == 1.0 and resolution_shift(4 * 4096, 4096) == 2.0

    def median(tokens: int, base: int) -> float:
        config = DiffusionConfig(shift_base_tokens=base)
        return training_timesteps(20000, tokens, torch.Generator().manual_seed(0), config).median().item()

    assert median(4096, 0) == median(16 * 4096, 0)  # shift_base_tokens=0: no shift
    assert median(4096, 4096) < median(4 * 4096, 4096) < median(16 * 4096, 4096)
    # On by default: clips up to 3600 tokens (the demo's 1,024) draw exactly the logit-normal
    # sampler's timesteps; a 720p 81-frame clip of Wan latents (75,600 tokens) shifts by sqrt(21).
    default = DiffusionConfig()
    assert torch.equal(
        training_timesteps(16, 1024, torch.Generator().manual_seed(3), default),
        sample_timesteps(16, torch.Generator().manual_seed(3)),
    )
    torch.testing.assert_close(
        training_timesteps(16, 75_600, torch.Generator().manual_seed(3), default),
        shift_timesteps(sample_timesteps(16, torch.Generator().manual_seed(3)), 21**0.5),
    )
