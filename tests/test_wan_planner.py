"""The planner for `model.variant=wan` and for LoRA, each figure checked against a measurement.

FLOPs against torch's FlopCounterMode over a real forward + backward (text-to-video, per-token
timesteps, image-to-video, LoRA); activation bytes of Wan blocks under every checkpointing policy
against what autograd saves; the LoRA parameter count against peft's adapters; LoRA state bytes
against a real 1-process DeepSpeed ZeRO-2 engine (`python -m tests.test_wan_planner engine-states-lora`
does that measurement in a process of its own); the plan of the Wan 2.1 14B preset without any files.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from sora_train.config import LoraConfig, ModelConfig, ParallelConfig
from sora_train.flops import (
    IMAGE,
    LOOKUP,
    SAMPLE,
    TEXT,
    TIME,
    VIDEO,
    classify_parameters,
    image_tokens,
    lora_targets,
    parameter_counts,
    planned_latent_channels,
    planned_latent_compression,
    planning_model,
    sample_flops,
)
from sora_train.models.denoiser import build_denoiser
from sora_train.models.dit import count_parameters
from sora_train.parallel.zero import zero3_fetch_sizes
from sora_train.planning.cli import main
from sora_train.planning.measure import measure_activation_bytes
from sora_train.planning.memory import CPU_KERNELS, activation_bytes, activation_model, state_bytes

from .conftest import assert_ok, run_module
from .test_planner import POLICIES, TOLERANCE, preset

# A tiny and a mid-size Wan: frozen umT5-style embeddings (text_dim wide), Wan 2.1 latents (16 channels).
TINY = ModelConfig(
    preset="wan_tiny", variant="wan", hidden_size=128, depth=2, num_heads=4, ffn_dim=256,
    latent_space="wan", text_encoder="umt5", text_dim=32, text_max_length=16,
)  # fmt: skip
MID = replace(
    TINY, preset="wan_mid", hidden_size=512, depth=4, ffn_dim=1536, text_dim=256, text_max_length=64
)
SMALL = replace(TINY, preset="wan_small", hidden_size=64, depth=3, ffn_dim=96, text_dim=40)  # activations
I2V = {"in_channels": 36, "image_dim": 128, "added_kv_proj_dim": 512}
WAN_PRESETS = ("wan21_t2v_1.3B", "wan21_t2v_14B", "wan22_ti2v_5B", "wan22_t2v_A14B")


def tokens_of(model: ModelConfig, clip: tuple[int, int, int]) -> int:
    (pt, ph, pw), (f, h, w) = model.patch_size, clip
    return (f // pt) * (h // ph) * (w // pw)


def inputs(model: ModelConfig, batch: int, clip: tuple[int, int, int], frames: bool = False) -> dict:
    """Latents, timesteps, frozen text embeddings, a frame mask (the first latent frame clean), image features."""
    generator = torch.Generator().manual_seed(0)
    channels = model.in_channels or planned_latent_channels(model)
    given = {
        "x": torch.randn(batch, channels, *clip, generator=generator),
        "t": torch.rand(batch, generator=generator),
        "text": torch.randn(batch, model.text_max_length, model.text_dim, generator=generator),
        "mask": torch.ones(batch, model.text_max_length, dtype=torch.bool),
        "frame_mask": None,
        "image": None,
    }
    if frames:
        given["frame_mask"] = torch.zeros(batch, clip[0], dtype=torch.bool)
        given["frame_mask"][:, 0] = True
    if model.image_dim is not None:
        given["image"] = torch.randn(batch, image_tokens(model), model.image_dim, generator=generator)
    return given


def counted_flops(denoiser: torch.nn.Module, given: dict) -> int:
    """FlopCounterMode's count of one forward + backward (math attention: matmuls it sees)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        args = (given["x"], given["t"], given["text"], given["mask"], given["frame_mask"])
        out = denoiser.dit(*args, given["image"]) if given["image"] is not None else denoiser(*args)
        out.square().mean().backward()
    return counter.get_total_flops()


# ---------------------------------------------------------------------------------------------
# Parameter roles and the planning model


@pytest.mark.parametrize("name", WAN_PRESETS)
def test_wan_presets_plan_without_files_and_count_their_released_sizes(name):
    model = preset(name, vae_path="/nonexistent/vae", text_encoder_path="/nonexistent/umt5")
    denoiser = planning_model(model)
    roles = classify_parameters(denoiser)
    counts = parameter_counts(model)
    assert counts.total == count_parameters(denoiser) == counts.trainable
    assert counts.total == pytest.approx(model.nominal_parameters, rel=0.01)
    assert denoiser.dit.patch_embedding.in_channels == 16 and denoiser.dit.proj_out.out_features == 16 * 4
    assert not list(denoiser.text_encoder.parameters())  # FrozenTextEmbeddings: Wan projects the umT5 output
    assert roles["dit.condition_embedder.text_embedder.linear_1.weight"] == TEXT
    assert roles["dit.blocks.0.attn2.to_k.weight"] == roles["dit.blocks.0.attn2.norm_k.weight"] == TEXT
    assert roles["dit.blocks.0.attn2.to_q.weight"] == roles["dit.blocks.0.attn1.to_v.weight"] == VIDEO
    assert roles["dit.blocks.0.scale_shift_table"] == roles["dit.scale_shift_table"] == SAMPLE
    assert roles["dit.condition_embedder.time_proj.weight"] == TIME
    assert roles["dit.patch_embedding.weight"] == roles["dit.proj_out.weight"] == VIDEO
    with torch.device("meta"):  # the same model build_denoiser makes (pixel space: no VAE file to read)
        pixel = replace(model, latent_space="pixel", vae_path=None)
        assert count_parameters(build_denoiser(pixel)) == parameter_counts(pixel).total


def test_image_to_video_roles_and_learned_encoder():
    model = replace(MID, **I2V, pos_embed_seq_len=20)
    roles = classify_parameters(planning_model(model))
    assert (
        roles["dit.blocks.1.attn2.add_k_proj.weight"]
        == roles["dit.blocks.1.attn2.norm_added_k.weight"]
        == IMAGE
    )
    assert roles["dit.condition_embedder.image_embedder.ff.net.0.proj.weight"] == IMAGE
    assert roles["dit.condition_embedder.image_embedder.pos_embed"] == LOOKUP
    assert image_tokens(model) == 20 and image_tokens(replace(model, pos_embed_seq_len=None)) == 257
    denoiser = planning_model(model)
    assert denoiser.dit.patch_embedding.in_channels == 36 and denoiser.dit.proj_out.out_features == 16 * 4
    learned = replace(TINY, text_encoder="learned", text_heads=2)
    assert classify_parameters(planning_model(learned))["text_encoder.token_embed.weight"] == LOOKUP


def test_a_wan_vae_config_sets_the_latent_channels_and_compression(tmp_path):
    """Wan 2.2's VAE (48 channels, 16x space) from its config.json; without it Wan 2.1's is assumed."""
    config = {
        "z_dim": 48,
        "dim_mult": [1, 2, 4, 4],
        "temperal_downsample": [False, True, True],
        "patch_size": 2,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = preset("wan22_ti2v_5B", vae_path=str(tmp_path))
    assert planned_latent_channels(model) == 48 and planned_latent_compression(model) == (4, 16, 16)
    assert planning_model(model).dit.patch_embedding.in_channels == 48
    missing = replace(model, vae_path=None)
    assert planned_latent_channels(missing) == 16 and planned_latent_compression(missing) == (4, 8, 8)


# ---------------------------------------------------------------------------------------------
# FLOPs


FLOP_CASES = {
    "tiny t2v": (TINY, 2, (4, 16, 16), False),
    # freq_dim 64: the formula charges the time MLP's first layer 6 FLOPs per parameter, but its input
    # (sinusoids) needs no gradient (4 done); at freq_dim 256 that is 3% of this 128-wide toy, 0.003% of 14B
    "tiny frame-conditioned": (replace(TINY, frame_conditioning=True, freq_dim=64), 2, (4, 16, 16), True),
    "mid t2v": (MID, 1, (3, 16, 16), False),
    "mid frame-conditioned": (replace(MID, frame_conditioning=True), 1, (3, 16, 16), True),
    "mid i2v": (replace(MID, **I2V), 1, (3, 16, 16), False),
    "mid flf2v": (replace(MID, **I2V, pos_embed_seq_len=20), 1, (3, 16, 16), False),
}


@pytest.mark.parametrize("case", FLOP_CASES)
def test_wan_flops_match_torch_flop_counter(case):
    model, batch, clip, frames = FLOP_CASES[case]
    torch.manual_seed(0)
    measured = counted_flops(planning_model(model, device="cpu"), inputs(model, batch, clip, frames))
    s, t = tokens_of(model, clip), model.text_max_length
    predicted = batch * sample_flops(model, s, t, timesteps_per_token=frames)
    print(f"{case}: {predicted / 1e9:.4f} vs {measured / 1e9:.4f} GFLOP ({predicted / measured - 1:+.2%})")
    assert abs(predicted / measured - 1) < 0.02, (predicted, measured)
    if frames:  # the time MLP per token is a real share: counting it per sample would miss the 2%
        assert batch * sample_flops(model, s, t) / measured < 0.98


@pytest.mark.parametrize(("model", "rank"), [(TINY, 8), (MID, 16)])
def test_lora_flops_count_the_work_done(model, rank):
    """Adapters 6 FLOPs per parameter, frozen weights 4 (input gradient only) or 2 (forward only)."""
    from sora_train.models.lora import LoraSpec, apply_lora

    pytest.importorskip("peft")
    model = replace(model, lora=LoraConfig(rank=rank))
    torch.manual_seed(0)
    denoiser = planning_model(model, device="cpu")
    apply_lora(denoiser, LoraSpec(rank, rank, 0.0, lora_targets(model)))
    clip, batch = (4, 16, 16), 2
    measured = counted_flops(denoiser, inputs(model, batch, clip))
    s, t = tokens_of(model, clip), model.text_max_length
    predicted = batch * sample_flops(model, s, t)
    full = batch * sample_flops(replace(model, lora=LoraConfig()), s, t)
    print(
        f"LoRA rank {rank}: {predicted / 1e9:.4f} vs {measured / 1e9:.4f} GFLOP ({predicted / measured - 1:+.2%})"
    )
    assert abs(predicted / measured - 1) < 0.02, (predicted, measured)
    assert predicted < 0.9 * full  # no weight gradients for the frozen base


# ---------------------------------------------------------------------------------------------
# Activations


def measured_and_planned(
    model: ModelConfig, batch: int, clip, dtype: torch.dtype, every: int = 2, frames=False
):
    """The CPU measurement of `model` under every policy, and `activation_bytes` of each (CPU kernels)."""
    measured = measure_activation_bytes(
        model, batch, clip, dtype, POLICIES, every, timesteps_per_token=frames
    )
    e, s = 4 if dtype == torch.float32 else 2, tokens_of(model, clip)
    planned = {
        policy: activation_bytes(
            model, batch, s, dtype_bytes=e, policy=policy, every=every, kernels=CPU_KERNELS,
            timesteps_per_token=frames,
        ).saved
        for policy in POLICIES
    }  # fmt: skip
    return measured, planned


LORA = LoraConfig(rank=8)
ACTIVATION_CASES = {
    "bf16, batch 2": (SMALL, 2, torch.bfloat16, 2, False),
    "fp32 (norm inputs are the residual itself)": (SMALL, 1, torch.float32, 2, False),
    "frame-conditioned: per-token modulation, bf16": (replace(SMALL, frame_conditioning=True), 2, torch.bfloat16, 2, True),
    "learned text encoder, bf16": (replace(SMALL, text_encoder="learned", text_dim=32, text_heads=2), 2, torch.bfloat16, 2, False),
    "no cross_attn_norm, 3 heads, patch 2x2x2, k=3": (
        replace(SMALL, cross_attn_norm=False, hidden_size=48, num_heads=3, patch_size=[2, 2, 2]), 2, torch.bfloat16, 3, False,
    ),
    "LoRA rank 8, bf16": (replace(SMALL, lora=LORA), 2, torch.bfloat16, 2, False),
    "LoRA rank 8, fp32": (replace(SMALL, lora=LORA), 1, torch.float32, 2, False),
    "LoRA rank 8, frame-conditioned, bf16, k=3": (replace(SMALL, lora=LORA, frame_conditioning=True), 2, torch.bfloat16, 3, True),
    "LoRA rank 8, learned text encoder, bf16": (
        replace(SMALL, lora=LORA, text_encoder="learned", text_dim=32, text_heads=2), 2, torch.bfloat16, 2, False,
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", ACTIVATION_CASES)
def test_wan_activation_bytes_match_saved_tensors(case):
    model, batch, dtype, every, frames = ACTIVATION_CASES[case]
    if model.lora.enabled:
        pytest.importorskip("peft")
    clip = (4, 8, 12)
    measured, planned = measured_and_planned(model, batch, clip, dtype, every, frames)
    for policy, nbytes in measured.saved.items():
        print(f"{case}, {policy}: planned {planned[policy]:,} vs measured {nbytes:,}")
        assert abs(planned[policy] / nbytes - 1) < TOLERANCE, (policy, planned[policy], nbytes)
    # block by block: what each saves beyond its inputs, and what selective checkpointing keeps of that
    e, s, t = 4 if dtype == torch.float32 else 2, tokens_of(model, clip), model.text_max_length
    for index, block in enumerate(activation_model(model, e, CPU_KERNELS, frames).blocks):
        expected = (block.whole - block.inputs_saved).bytes(batch, s, t), block.kept_saved.bytes(batch, s, t)
        assert expected == (measured.whole.blocks[index], measured.whole.kept[index]), index
    if model.lora.enabled:  # a frozen base saves less; selective keeps base and lora_B outputs: more
        full = measured_and_planned(replace(model, lora=LoraConfig()), batch, clip, dtype, every, frames)[1]
        assert planned["none"] < 0.8 * full["none"] and planned["selective"] > full["selective"]


def test_lora_with_other_targets_is_planned_with_the_full_training_tables():
    """Only the default targets have their own tables; other targets get full training's, an upper bound."""
    pytest.importorskip("peft")
    model = replace(SMALL, lora=LoraConfig(rank=8, targets=[r"dit\.blocks\.\d+\.ffn\.net\.(0\.proj|2)"]))
    measured, planned = measured_and_planned(model, 2, (4, 8, 12), torch.bfloat16)
    assert (
        planned == measured_and_planned(replace(model, lora=LoraConfig()), 2, (4, 8, 12), torch.bfloat16)[1]
    )
    assert all(planned[policy] >= measured.saved[policy] for policy in POLICIES), (planned, measured.saved)


def test_wan_per_token_block_coefficient_and_mid_size():
    """The slope of a block's saved bytes over its tokens is the planned per-token coefficient (two
    buckets), and a 512-wide Wan plans what it saves."""
    found = {}
    for clip in ((4, 8, 12), (4, 16, 24)):
        found[tokens_of(SMALL, clip)] = measure_activation_bytes(SMALL, 1, clip, torch.bfloat16, ("none",))
    (s1, small), (s2, large) = found.items()
    block = activation_model(SMALL, 2, CPU_KERNELS).blocks[1]  # not the first: RoPE tables are shared
    slope = (large.whole.blocks[1] - small.whole.blocks[1]) / (s2 - s1)
    assert slope == (block.whole - block.inputs_saved).token
    for mid in (replace(MID, depth=2), replace(MID, depth=2, lora=LoraConfig(rank=16))):
        measured, planned = measured_and_planned(mid, 1, (3, 16, 16), torch.bfloat16)
        assert all(abs(planned[p] / measured.saved[p] - 1) < TOLERANCE for p in POLICIES), (
            planned,
            measured.saved,
        )


# ---------------------------------------------------------------------------------------------
# LoRA: parameters and states


@pytest.mark.parametrize("targets", [None, [r"dit\.blocks\.\d+\.attn1\.to_(q|v)", r"dit\.proj_out"]])
def test_lora_count_equals_the_adapters_apply_lora_adds(targets):
    from sora_train.models.lora import LoraSpec, apply_lora, is_adapter

    pytest.importorskip("peft")
    model = replace(MID, lora=LoraConfig(rank=8, targets=targets))
    counts, base = parameter_counts(model), parameter_counts(replace(model, lora=LoraConfig()))
    denoiser = planning_model(model, device="cpu")
    apply_lora(denoiser, LoraSpec(8, 8, 0.0, lora_targets(model)))
    adapters = [p.numel() for n, p in denoiser.named_parameters() if is_adapter(n)]
    assert (
        counts.trainable
        == counts.adapters
        == sum(adapters)
        == sum(p.numel() for p in denoiser.parameters() if p.requires_grad)
    )
    assert counts.total == count_parameters(denoiser) == base.total + sum(adapters)
    assert sorted(counts.trainable_sizes) == sorted(adapters)


def test_lora_state_bytes_by_zero_stage():
    model = preset("wan21_t2v_14B", lora=LoraConfig(rank=64))
    counts, world = parameter_counts(model), 8
    frozen = counts.total - counts.trainable
    # 8 attention projections D -> D (the caption is already D wide), the FFN's D -> M and M -> D
    assert counts.trainable == 40 * 64 * (8 * 2 * 5120 + 2 * (5120 + 13824))
    for stage in (1, 2, 3):
        states = state_bytes(counts, ParallelConfig(zero_stage=stage), world, bf16=True)
        assert states.optimizer == 12 * -(-counts.trainable // world)
        assert states.gradients == 2 * (counts.trainable if stage == 1 else -(-counts.trainable // world))
        if stage < 3:
            assert states.parameters == 2 * counts.total and states.ema == 4 * -(-counts.trainable // world)
        else:  # everything sharded, the frozen base too; the EMA holds the adapters' partitions
            largest = max(counts.tensor_sizes)  # the prefetch bucket is raised to it (zero3_fetch_sizes)
            prefetch, _ = zero3_fetch_sizes(ParallelConfig(zero_stage=3), largest)
            whole = sum(n for n in counts.tensor_sizes if n <= 100_000) + prefetch + largest
            assert 2 * frozen / world < states.parameters < 2 * (counts.total / world + whole)
            assert states.ema == 4 * sum(-(-n // world) for n in counts.trainable_sizes)


def test_lora_states_match_a_deepspeed_engine():
    """Parameters + gradients + optimizer states of a real 1-process ZeRO-2 engine training a small Wan's
    LoRA adapters on CPU, fp32 and bf16."""
    pytest.importorskip("peft")
    result = run_module("tests.test_wan_planner", "engine-states-lora", timeout=300)
    assert_ok(result)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    counts = parameter_counts(LORA_ENGINE_MODEL)
    for precision, nbytes in measured.items():
        states = state_bytes(counts, ParallelConfig(zero_stage=2), 1, bf16=precision == "bf16")
        planned = states.parameters + states.gradients + states.optimizer
        print(f"LoRA {precision}: planned {planned:,} vs measured {nbytes:,} B")
        assert abs(planned / nbytes - 1) < 0.001, (precision, planned, nbytes)
    assert measured["fp32"] > measured["bf16"]


# ---------------------------------------------------------------------------------------------
# The plan


PLAN_14B = ["model=wan21_t2v_14B", "data=latents", "data.train=unused", "data.num_frames=81", "data.height=480",
            "data.width=832", "data.tokens_per_batch=32760", "parallel=zero3", "train.precision=bf16",
            "train.activation_checkpointing=full"]  # fmt: skip


def test_sora_plan_wan_14b_full_and_lora_without_model_files(capsys):
    assert main([*PLAN_14B, "--gpus", "8", "--json"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert main([*PLAN_14B, "model.lora.rank=64", "--gpus", "8", "--json"]) == 0
    lora = json.loads(capsys.readouterr().out)
    assert full["parameters"] == full["trainable"] == parameter_counts(preset("wan21_t2v_14B")).total
    assert lora["trainable"] == parameter_counts(preset("wan21_t2v_14B", lora=LoraConfig(rank=64))).adapters
    assert (lora["lora_rank"], lora["lora_modules"]) == (64, 40 * 10)
    assert lora["states"]["optimizer"] * 40 < full["states"]["optimizer"]
    bucket = full["buckets"][0]
    assert bucket["latent_grid"] == [21, 60, 104] and bucket["video_tokens"] == 32760
    assert lora["buckets"][0]["sample_flops"] < bucket["sample_flops"]
    main([*PLAN_14B, "model.lora.rank=64", "--gpus", "8"])
    out = capsys.readouterr().out
    assert (
        "(306.7M trainable: LoRA rank 64 on 400 Linear modules)" in out and "FLOPs count the work done" in out
    )


# ---------------------------------------------------------------------------------------------
# Measurements that run in a process of their own

LORA_ENGINE_MODEL = replace(
    SMALL,
    latent_space="pixel",
    lora=LoraConfig(rank=4, targets=[r"dit\.blocks\.\d+\.(attn1\.to_q|ffn\.net\.2)"]),
)


def lora_engine_state_bytes(precision: str) -> int:
    """Parameter, gradient and optimizer-state bytes of a 1-process ZeRO-2 engine (torch AdamW) on CPU
    training a small Wan's LoRA adapters, after one step and the next backward (call after `init_distributed`)."""
    from sora_train.checkpoint.universal import UNIVERSAL_INFO
    from sora_train.config import OptimConfig
    from sora_train.diffusion.flow import flow_loss
    from sora_train.models.lora import LoraSpec, apply_lora
    from sora_train.optim import build_schedule
    from sora_train.parallel.zero import build_engine, deepspeed_config

    from .test_planner import engine_tensors

    model = LORA_ENGINE_MODEL
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(0)
    denoiser = build_denoiser(model)
    apply_lora(denoiser, LoraSpec(4, 4, 0.0, lora_targets(model)))
    # One AdamW group: optim.parameter_groups would add an empty group for 1-D parameters (adapters are
    # all matrices), which DeepSpeed drops, and the LR schedule then no longer matches the optimizer.
    optimizer = torch.optim.AdamW([p for p in denoiser.parameters() if p.requires_grad], lr=1e-4)
    config = deepspeed_config(
        ParallelConfig(zero_stage=2), global_batch=2, micro_batch=2, accumulation=1, grad_clip=1.0,
        bf16=precision == "bf16",
    )  # fmt: skip
    engine = build_engine(
        denoiser, optimizer, build_schedule(optimizer, OptimConfig(), 10), config, UNIVERSAL_INFO
    )
    text, mask = torch.randn(2, model.text_max_length, model.text_dim).to(dtype), torch.ones(2, 16).bool()
    x0, noise = torch.randn(2, 3, 4, 16, 16).to(dtype), torch.randn(2, 3, 4, 16, 16).to(dtype)
    t = torch.rand(2).to(dtype)
    for _ in range(2):  # after the second backward: optimizer states (from step 1) and gradients exist
        engine.backward(flow_loss(lambda x_t, t_: engine(x_t, t_, text, mask), x0, noise, t))
        nbytes = engine_tensors(engine)
        engine.step()
    return nbytes


if __name__ == "__main__":
    if sys.argv[1] == "engine-states-lora":
        from sora_train.parallel.dist import init_distributed, shutdown_distributed

        init_distributed()
        print(json.dumps({precision: lora_engine_state_bytes(precision) for precision in ("fp32", "bf16")}))
        shutdown_distributed()
    else:
        raise SystemExit(f"unknown measurement {sys.argv[1]!r}")
