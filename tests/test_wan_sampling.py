"""Our sampling convention is diffusers' FlowMatchEulerDiscreteScheduler as WanPipeline uses it:
the same sigma schedule for a shift, the same Euler step, the same guidance, the model's timestep
1000·t, and the same flow (x_t = (1 - σ)·x0 + σ·noise, target noise - x0). fp32 throughout."""

from __future__ import annotations

import pytest
import torch

from sora_train.config import DiffusionConfig
from sora_train.diffusion.flow import interpolate, mode_timesteps, sample_timesteps, velocity_target
from sora_train.diffusion.sampler import TRAIN_TIMESTEPS, euler_sample, euler_step, sample_times
from sora_train.models.dit import TimestepEmbedder

schedulers = pytest.importorskip("diffusers.schedulers.scheduling_flow_match_euler_discrete")
FlowMatchEulerDiscreteScheduler = schedulers.FlowMatchEulerDiscreteScheduler

# Wan 2.1: 5.0 at 720p, 3.0 at 480p (diffusers' WanPipeline docs); Wan 2.2 A14B: 12.0 T2V, 5.0 I2V.
SHIFTS = (1.0, 3.0, 5.0, 12.0)


def wan_scheduler(shift: float, steps: int) -> FlowMatchEulerDiscreteScheduler:
    """The scheduler as WanPipeline drives it: a fixed shift, `set_timesteps(steps)`, begin index 0."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=TRAIN_TIMESTEPS, shift=shift)
    scheduler.set_timesteps(steps)
    scheduler.set_begin_index(0)
    return scheduler


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("steps", [1, 2, 10, 40, 50])
def test_the_shifted_schedule_is_the_schedulers_sigmas(shift, steps):
    scheduler = wan_scheduler(shift, steps)
    ours = sample_times(steps, shift)
    assert ours.dtype == torch.float32 and ours.shape == scheduler.sigmas.shape
    assert (ours - scheduler.sigmas).abs().max().item() <= 1e-6
    # the model's timestep is 1000·t: what WanPipeline hands the transformer
    assert (TRAIN_TIMESTEPS * ours[:-1] - scheduler.timesteps).abs().max().item() <= 1e-3


def test_the_configured_sample_shift_reaches_the_sampler():
    """diffusion.sample_shift=None keeps the plain uniform steps; a shift gives the scheduler's times."""
    scheduler = wan_scheduler(5.0, 6)
    seen = []

    def velocity(x, t, conditional):
        seen.append(t[0].item())
        return torch.zeros_like(x)

    euler_sample(velocity, torch.zeros(1, 2), 6, shift=DiffusionConfig(sample_shift=5.0).sample_shift)
    torch.testing.assert_close(torch.tensor(seen), scheduler.sigmas[:-1], rtol=0, atol=1e-6)
    assert DiffusionConfig().sample_shift is None


@pytest.mark.parametrize("shift", [3.0, 5.0])
def test_one_euler_step_is_one_scheduler_step(shift):
    steps = 8
    scheduler, times = wan_scheduler(shift, steps), sample_times(steps, shift)
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for i in range(steps):
        x = torch.randn(2, 16, 3, 8, 8, generator=generator)
        output = torch.randn(2, 16, 3, 8, 8, generator=generator)
        theirs = scheduler.step(output, scheduler.timesteps[i], x, return_dict=False)[0]
        ours = euler_step(x, output, times[i], times[i + 1])
        worst = max(worst, (ours - theirs).abs().max().item())
    assert worst <= 1e-6


@pytest.mark.parametrize("shift", [3.0, 12.0])
def test_a_guided_sampling_loop_is_the_wan_pipelines(shift):
    """Our sampler and WanPipeline's loop (CFG as noise_uncond + g·(noise_pred - noise_uncond), then
    scheduler.step) fed the same model: every model input, every timestep, and the result agree."""
    steps, guidance = 12, 4.0
    weights = torch.randn(16, 16, generator=torch.Generator().manual_seed(1)) / 4

    def model(x: torch.Tensor, timestep: torch.Tensor, conditional: bool) -> torch.Tensor:
        """A nonlinear stand-in transformer that reads the (1000-scale) timestep and the branch."""
        mixed = torch.einsum("bcfhw,cd->bdfhw", x, weights)
        return torch.tanh(mixed + timestep.view(-1, 1, 1, 1, 1) / TRAIN_TIMESTEPS) * (
            1.0 if conditional else 0.7
        )

    noise = torch.randn(2, 16, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    ours_seen, theirs_seen = [], []

    def velocity(x, t, conditional):  # our model call: t in [0, 1]; the transformer embeds 1000·t
        ours_seen.append((x.clone(), t.clone()))
        return model(x, TRAIN_TIMESTEPS * t, conditional)

    ours = euler_sample(velocity, noise, steps, guidance, shift=shift)
    scheduler, latents = wan_scheduler(shift, steps), noise.clone()
    for t in scheduler.timesteps:
        timestep = t.expand(latents.shape[0])
        theirs_seen.append((latents.clone(), timestep / TRAIN_TIMESTEPS))
        noise_pred, noise_uncond = model(latents, timestep, True), model(latents, timestep, False)
        noise_pred = noise_uncond + guidance * (noise_pred - noise_uncond)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
    ours_inputs = ours_seen[::2]  # the conditional calls (each step calls conditional, then unconditional)
    assert len(ours_inputs) == len(theirs_seen) == steps
    for (x_ours, t_ours), (x_theirs, t_theirs) in zip(ours_inputs, theirs_seen, strict=True):
        assert (x_ours - x_theirs).abs().max().item() <= 1e-5
        assert (t_ours - t_theirs).abs().max().item() <= 1e-6
    assert (ours - latents).abs().max().item() <= 1e-5


def test_the_flow_and_its_target_have_diffusers_sign():
    """diffusers trains on x_t = scheduler.scale_noise(x0, t, noise) = (1 - σ)·x0 + σ·noise with target
    noise - x0; that target, stepped by the scheduler, moves x_σ exactly to x_σ' along the path."""
    scheduler = wan_scheduler(5.0, 10)
    x0, noise = torch.randn(2, 16, 3, 8, 8), torch.randn(2, 16, 3, 8, 8)
    target = velocity_target(x0, noise)
    torch.testing.assert_close(target, noise - x0, rtol=0, atol=0)
    for i, timestep in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[i].expand(2)
        x_t = interpolate(x0, noise, sigma)
        torch.testing.assert_close(
            x_t, scheduler.scale_noise(x0, timestep.expand(2), noise), rtol=0, atol=1e-6
        )
        stepped = scheduler.step(target, timestep, x_t, return_dict=False)[0]
        torch.testing.assert_close(stepped, interpolate(x0, noise, scheduler.sigmas[i + 1].expand(2)),
                                   rtol=0, atol=1e-5)  # fmt: skip


def test_training_timesteps_are_diffusers_sd3_densities():
    """Our logit-normal and mode timesteps are diffusers' `compute_density_for_timestep_sampling` σ."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    mode = compute_density_for_timestep_sampling(
        "mode", 4096, mode_scale=1.29, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(mode_timesteps(4096, torch.Generator().manual_seed(0), 1.29), mode)
    logit = compute_density_for_timestep_sampling(
        "logit_normal", 4096, logit_mean=0.5, logit_std=1.2, generator=torch.Generator().manual_seed(0)
    )
    ours = sample_timesteps(4096, torch.Generator().manual_seed(0), mean=0.5, std=1.2)
    torch.testing.assert_close(ours, logit, rtol=0, atol=1e-6)


def test_the_time_embedding_reads_1000_t_like_wans():
    """Our time embedding's sinusoid at t is WanTimeTextImageEmbedding's `Timesteps(freq_dim,
    flip_sin_to_cos=True, downscale_freq_shift=0)` at the pipeline's timestep 1000·t."""
    from diffusers.models.embeddings import get_timestep_embedding

    embedder = TimestepEmbedder(hidden_size=8, freq_dim=256)
    features = []
    embedder.mlp[0].register_forward_hook(lambda module, inputs, output: features.append(inputs[0]))
    t = sample_times(40, 5.0)[:-1]
    embedder(t)
    theirs = get_timestep_embedding(TRAIN_TIMESTEPS * t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert (features[0] - theirs).abs().max().item() <= 1e-4  # float32 sin/cos of arguments up to 1000
