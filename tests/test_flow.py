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
