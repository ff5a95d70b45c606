"""The FLOP counter, the GPU table and sora-plan, each checked against a measurement.

FLOPs against torch's FlopCounterMode over a real forward + backward; activation bytes under every
checkpointing policy, for both variants, against what autograd saves (saved_tensors_hooks) and
what selective checkpointing caches; parameter, gradient and optimizer bytes against a real
DeepSpeed engine; on a GPU, the planned peak against torch.cuda.max_memory_allocated.
Run as `python -m tests.test_planner engine-states|gpu-peak ...` it does the measurements that
need a process of their own (DeepSpeed keeps process-wide state).
"""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import replace

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from sora_train.config import ModelConfig, ParallelConfig
from sora_train.flops import (
    LOOKUP,
    SAMPLE,
    TEXT,
    VIDEO,
    classify_parameters,
    parameter_counts,
    parameter_role,
    planning_model,
    sample_flops,
)
from sora_train.hardware import device_peak_flops, gpu_spec, match_device_name
from sora_train.models.denoiser import build_denoiser, build_tokenizer
from sora_train.models.dit import count_parameters
from sora_train.planning.cli import compose_config, main
from sora_train.planning.measure import MeasuredActivations, measure_activation_bytes
from sora_train.planning.memory import (
    CPU_KERNELS,
    activation_bytes,
    activation_model,
    block_kinds,
    state_bytes,
)
from sora_train.planning.plan import plan_run, required_sequence_parallel
from sora_train.recipes import config_dir
from sora_train.throughput import attended_text_tokens

from .conftest import assert_ok, run_module


@functools.cache
def _composed(name: str) -> ModelConfig:
    with initialize_config_dir(str(config_dir() / "model"), version_base="1.3"):
        return ModelConfig(**OmegaConf.to_container(compose(name)))


def preset(name: str, **changes) -> ModelConfig:
    """A model preset composed from configs/model/NAME.yaml, as sora-train composes it."""
    return replace(_composed(name), **changes)


def tokens_of(model: ModelConfig, clip: tuple[int, int, int]) -> int:
    """Video tokens of a (f, h, w) latent clip."""
    (pt, ph, pw), (f, h, w) = model.patch_size, clip
    return (f // pt) * (h // ph) * (w // pw)


# ---------------------------------------------------------------------------------------------
# FLOPs


@pytest.mark.parametrize("name", ["tiny", "S", "B"])
def test_every_parameter_has_a_role_and_the_roles_sum_to_the_model(name):
    for text_encoder in ("learned", "t5"):
        model = preset(name, text_encoder=text_encoder)
        denoiser = planning_model(model)
        roles = classify_parameters(denoiser)
        counts = parameter_counts(model)
        assert counts.total == count_parameters(denoiser)
        assert min(counts.video, counts.text, counts.sample) > 0
        if text_encoder == "t5":  # TextProjection: LayerNorm(4096) + Linear(4096 -> text_dim)
            assert counts.lookup == 0
            assert roles["text_encoder.proj.weight"] == TEXT
            assert denoiser.text_encoder.proj.in_features == 4096
    with torch.device("meta"):
        assert count_parameters(build_denoiser(preset(name))) == parameter_counts(preset(name)).total
    assert parameter_role("dit.blocks.3.cross_attn.kv.weight") == TEXT
    assert parameter_role("dit.blocks.3.cross_attn.k_norm.weight") == TEXT
    assert parameter_role("dit.blocks.3.cross_attn.q_norm.weight") == VIDEO
    assert parameter_role("dit.blocks.3.modulation.1.weight") == SAMPLE
    assert parameter_role("dit.final.modulation.1.bias") == SAMPLE
    assert parameter_role("dit.final.linear.weight") == VIDEO
    assert parameter_role("text_encoder.token_embed.weight") == LOOKUP
    with pytest.raises(ValueError, match="no FLOP role"):
        parameter_role("dit.new_module.weight")


@pytest.mark.parametrize(
    ("name", "changes", "batch", "clip"),
    [
        ("tiny", {}, 2, (8, 16, 16)),
        ("tiny", {"text_encoder": "t5"}, 1, (4, 16, 16)),
        ("S", {}, 1, (1, 16, 16)),
    ],
)
def test_flops_match_torch_flop_counter(name, changes, batch, clip):
    model = preset(name, **changes)
    torch.manual_seed(0)
    if model.text_encoder == "learned":
        denoiser = build_denoiser(model)
        text, mask = build_tokenizer(model)(["a red square moving left"] * batch)
    else:  # frozen T5 embeddings (4096 wide, the planner's assumption without the encoder's files)
        denoiser = planning_model(model, device="cpu")
        text, mask = (
            torch.randn(batch, model.text_max_length, 4096),
            torch.ones(batch, model.text_max_length).bool(),
        )
    x, t = torch.randn(batch, 3, *clip), torch.rand(batch)
    # The math backend runs attention as matmuls, which FlopCounterMode counts (CPU flash attention it does not).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        denoiser(x, t, text, mask).square().mean().backward()
    measured = counter.get_total_flops()
    s, text_tokens = tokens_of(model, clip), attended_text_tokens(mask, model.variant)  # padding cut
    predicted = batch * sample_flops(model, s, text_tokens)
    assert abs(predicted / measured - 1) < 0.02, (predicted, measured)
    attention = batch * 12 * model.depth * model.hidden_size * (s * s + s * text_tokens)
    if name == "tiny":  # the quadratic term is a real share of this measurement, so it is checked too
        assert attention / measured > 0.1


def test_frozen_encoder_width_comes_from_its_config_or_is_taken_as_4096(tmp_path):
    learned = preset("tiny")
    encoder = planning_model(learned).text_encoder
    encoder_params = sum(p.numel() for name, p in encoder.named_parameters() if "embed" not in name)
    dit_text = parameter_counts(learned).text - encoder_params  # text_proj, cross-attention kv and k-norm
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 512}))
    for path, width in ((None, 4096), (str(tmp_path), 512)):
        counts = parameter_counts(replace(learned, text_encoder="umt5", text_encoder_path=path))
        projection = 2 * width + width * learned.text_dim + learned.text_dim  # LayerNorm + Linear
        assert counts.text == dit_text + projection


# ---------------------------------------------------------------------------------------------
# Activations


TINY_BUCKETS = ((8, 16, 16), (8, 32, 32))  # latent clips of the tiny preset (pixels: 256 and 1024 tokens)
POLICIES = ("none", "full", "every_k", "selective")
TOLERANCE = 0.001  # planned against measured activation bytes (measured errors: 0.02% at most)


def measured_and_planned(model: ModelConfig, batch: int, clip, dtype: torch.dtype, every: int = 2):
    """The measurement of `model` under every policy, and `activation_bytes` of each (CPU kernels)."""
    measured = measure_activation_bytes(model, batch, clip, dtype, POLICIES, every)
    e, s = 4 if dtype == torch.float32 else 2, tokens_of(model, clip)
    planned = {
        policy: activation_bytes(
            model, batch, s, dtype_bytes=e, policy=policy, every=every, kernels=CPU_KERNELS
        ).saved
        for policy in POLICIES
    }
    return measured, planned


def assert_close_bytes(planned: dict[str, int], measured: dict[str, int]) -> None:
    for policy, nbytes in measured.items():
        assert abs(planned[policy] / nbytes - 1) < TOLERANCE, (policy, planned[policy], nbytes)


@pytest.fixture(scope="module")
def tiny_measured() -> dict[tuple[int, int, int], tuple[MeasuredActivations, dict[str, int]]]:
    """Bytes kept for backward by the tiny preset at two buckets (fp32, one sample) under every
    policy: measured and planned."""
    return {clip: measured_and_planned(preset("tiny"), 1, clip, torch.float32) for clip in TINY_BUCKETS}


@pytest.mark.parametrize("clip", TINY_BUCKETS)
def test_activation_bytes_match_saved_tensors_for_tiny(tiny_measured, clip):
    measured, planned = tiny_measured[clip]
    assert_close_bytes(planned, measured.saved)
    # every_k (k=2) keeps half the blocks whole; selective keeps each block's matmul and attention outputs
    saved = measured.saved
    assert saved["none"] > saved["every_k"] > saved["selective"] > saved["full"], saved
    assert 3 * saved["full"] < saved["none"]


def test_per_token_block_coefficient_matches_saved_tensors(tiny_measured):
    """The slope of one block's saved bytes over its tokens is the analytic per-token coefficient."""
    model = preset("tiny")
    blocks = {clip: (tiny_measured[clip][0].whole.blocks[0], tokens_of(model, clip)) for clip in TINY_BUCKETS}
    (small, s1), (large, s2) = blocks.values()
    block = activation_model(model, 4, CPU_KERNELS).blocks[0]
    # a measured block excludes its inputs (the residual stream)
    predicted = (block.whole - block.inputs).token + block.whole.position
    assert abs((large - small) / (s2 - s1) / predicted - 1) < 0.005, ((large - small) / (s2 - s1), predicted)


@pytest.mark.parametrize("changes", [{"qk_norm": False}, {"text_encoder": "t5"}, {"shared_modulation": True}])
def test_activation_bytes_follow_model_variants_in_bf16(changes):
    measured, planned = measured_and_planned(preset("tiny", **changes), 2, (4, 16, 16), torch.bfloat16)
    assert_close_bytes(planned, measured.saved)


@pytest.mark.parametrize(
    ("changes", "batch", "dtype", "every"),
    [
        ({"single_stream_blocks": 0}, 1, torch.float32, 2),  # the last double-stream block: keys-only text
        ({"single_stream_blocks": 2}, 2, torch.bfloat16, 3),  # every_k: blocks 0 and 3 (the last)
        ({"single_stream_blocks": 1, "qk_norm": False}, 2, torch.bfloat16, 2),
    ],
)
def test_activation_bytes_of_mmdit_match_saved_tensors(changes, batch, dtype, every):
    model, clip = preset("tiny", variant="mmdit", **changes), (8, 16, 16)
    measured, planned = measured_and_planned(model, batch, clip, dtype, every)
    assert_close_bytes(planned, measured.saved)
    # block by block: what each kind saves beyond its inputs, and what selective checkpointing keeps of that
    e, s, t = 4 if dtype == torch.float32 else 2, tokens_of(model, clip), model.text_max_length
    for index, block in enumerate(activation_model(model, e, CPU_KERNELS).blocks):
        expected = (block.whole - block.inputs).bytes(batch, s, t), block.kept_saved.bytes(batch, s, t)
        found = measured.whole.blocks[index], measured.whole.kept[index]
        assert expected == pytest.approx(found, rel=TOLERANCE), (block_kinds(model)[index], expected, found)


# ---------------------------------------------------------------------------------------------
# Parameters, gradients, optimizer states


def test_state_bytes_by_zero_stage_and_offload():
    counts = parameter_counts(preset("B"))
    total, world = counts.total, 8
    plain = ParallelConfig(zero_stage=1)
    one = state_bytes(counts, plain, world, bf16=True)
    two = state_bytes(counts, replace(plain, zero_stage=2), world, bf16=True)
    three = state_bytes(counts, replace(plain, zero_stage=3), world, bf16=True)
    assert one.parameters == two.parameters == 2 * total
    assert one.gradients == 2 * total and two.gradients == three.gradients == 2 * -(-total // world)
    assert one.optimizer == two.optimizer == three.optimizer == 12 * -(-total // world)
    assert three.parameters < two.parameters
    assert one.ema == two.ema == 4 * -(-total // world)  # fp32, one slice of the flattened master
    assert three.ema == 4 * sum(-(-n // world) for n in counts.tensor_sizes)  # sharded like the parameters
    offloaded = state_bytes(
        counts, replace(plain, zero_stage=3, offload_optimizer=True, offload_params=True), world, True
    )
    assert offloaded.optimizer == 0 and offloaded.host >= three.optimizer
    below_three = state_bytes(counts, replace(plain, zero_stage=2, offload_optimizer=True), world, True)
    assert below_three.ema == 0 and below_three.host == three.optimizer + 4 * -(-total // world) * 2
    assert offloaded.parameters < three.parameters


def test_states_match_a_deepspeed_engine():
    """Parameters + gradients + optimizer states of a real 1-process ZeRO-2 engine on CPU, fp32 and bf16."""
    result = run_module("tests.test_planner", "engine-states", timeout=300)
    assert_ok(result)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    counts = parameter_counts(preset("tiny"))
    for precision, nbytes in measured.items():
        states = state_bytes(counts, ParallelConfig(zero_stage=2), 1, bf16=precision == "bf16")
        planned = states.parameters + states.gradients + states.optimizer
        assert abs(planned / nbytes - 1) < 0.001, (precision, planned, nbytes)
    assert measured["fp32"] > measured["bf16"]  # not the same number twice


# ---------------------------------------------------------------------------------------------
# The plan and the command


def test_plan_of_a_480p_recipe(capsys):
    overrides = ["model=B", "data.buckets=video_480p", "model.latent_space=wan", "parallel=zero3",
                 "parallel.sequence_parallel=4", "train.activation_checkpointing=full"]  # fmt: skip
    code = main([*overrides, "--gpus", "8", "--gpu", "H200", "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert code == 0 and plan["fits"]
    assert (plan["data_parallel"], plan["sequence_parallel"], plan["zero_stage"]) == (2, 4, 3)
    assert plan["activation_checkpointing"] == "full" and plan["fitting_checkpointing"] == []
    first = plan["buckets"][0]
    assert first["name"] == "81x480x832" and first["latent_grid"] == [21, 60, 104]
    assert first["video_tokens"] == 21 * 30 * 52
    assert first["tokens_per_gpu"] == first["batch"] * -(-first["video_tokens"] // 4)
    assert len(plan["buckets"]) == 6


def test_buckets_that_do_not_fit_are_flagged_with_a_sequence_parallel_degree(capsys):
    overrides = [
        "model=B",
        "data.buckets=video_480p",
        "model.latent_space=wan",
        "data.tokens_per_batch=131072",
    ]
    code = main([*overrides, "--gpus", "8", "--gpu", "L40S"])
    out = capsys.readouterr().out
    assert code == 1 and "DOES NOT FIT" in out and " NO" in out and "activation checkpointing none" in out
    assert "every bucket fits with train.activation_checkpointing=selective, every_k or full" in out
    cfg = compose_config(overrides)
    degree = required_sequence_parallel(cfg, 8, "L40S")
    assert degree is not None and degree > 1 and f"parallel.sequence_parallel={degree}" in out

    def at(sp: int):
        return plan_run(replace(cfg, parallel=replace(cfg.parallel, sequence_parallel=sp)), 8, "L40S")

    assert at(degree).fits and not at(degree // 2).fits
    # checkpointing shrinks the activations of the largest bucket several times over
    whole = at(1).buckets[0].activation_bytes
    cfg.train.activation_checkpointing = "full"
    assert plan_run(cfg, 8, "L40S").buckets[0].activation_bytes * 3 < whole


@pytest.mark.parametrize("single_stream_blocks", [0, 4])
def test_plan_of_mmdit_names_the_policy_and_orders_its_activations(capsys, single_stream_blocks):
    overrides = ["model=B", "model.variant=mmdit", f"model.single_stream_blocks={single_stream_blocks}",
                 "data.buckets=video_480p", "model.latent_space=wan", "data.tokens_per_batch=131072"]  # fmt: skip
    cfg = compose_config(overrides)
    saved = {}
    for policy in ("none", "every_k", "selective", "full"):
        cfg.train.activation_checkpointing = policy
        saved[policy] = plan_run(cfg, 8, "H100").buckets[0].activation_bytes
    assert saved["none"] > saved["every_k"] > saved["selective"] > 2 * saved["full"], saved
    main([*overrides, "train.activation_checkpointing=every_k", "train.activation_checkpointing_every=3"])
    assert "activation checkpointing every_k (k=3)" in capsys.readouterr().out


def test_bad_input_exits_2_with_one_line(capsys):
    assert main(["--gpu", "V100"]) == 2
    assert "H100" in capsys.readouterr().err
    assert main(["parallel.sequence_parallel=3", "--gpus", "4"]) == 2
    assert "sequence_parallel=3" in capsys.readouterr().err
    assert main(["model=nope"]) == 2
    assert "unknown model" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Hardware


def test_gpu_table_and_device_names():
    assert gpu_spec("h200").peak_flops == gpu_spec("H100").peak_flops == 989e12
    assert gpu_spec("A100-40GB").peak_flops == 312e12 and gpu_spec("L40S").memory_bytes > 44 * 2**30
    with pytest.raises(ValueError, match="H100, H100-PCIe"):
        gpu_spec("V100")
    expected = {
        "NVIDIA H100 80GB HBM3": "H100", "NVIDIA H100 PCIe": "H100-PCIe", "NVIDIA H200": "H200",
        "NVIDIA A100-SXM4-80GB": "A100-80GB", "NVIDIA A100-PCIE-40GB": "A100-40GB", "NVIDIA L40S": "L40S",
    }  # fmt: skip
    for device_name, name in expected.items():
        assert match_device_name(device_name).name == name
    assert match_device_name("NVIDIA GeForce RTX 4090") is None
    assert device_peak_flops(torch.device("cpu")) is None


# ---------------------------------------------------------------------------------------------
# GPU: the planned peak against the CUDA allocator (skipped without CUDA)

GPU_OVERRIDES = [
    "model=S", "data.num_frames=4", "data.height=128", "data.width=128", "train.global_batch_size=1",
    "train.precision=bf16", "wandb.mode=disabled",
]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("policy", ["none", "selective", "full"])
def test_planned_peak_matches_cuda_max_memory_allocated(policy):
    result = run_module("tests.test_planner", "gpu-peak", policy, timeout=600)
    assert_ok(result)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    print(figures)  # the figures docs/planner.md records
    assert abs(figures["planned"] / figures["measured"] - 1) < 0.25, figures


# ---------------------------------------------------------------------------------------------
# Measurements that run in a process of their own


def _storage_bytes(tensors) -> dict[int, int]:
    """Unique storages among `tensors` (None skipped): data pointer -> bytes."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}


def engine_state_bytes(precision: str) -> int:
    """Parameter, gradient and optimizer-state bytes of a 1-process ZeRO-2 engine (torch AdamW) on CPU,
    after one step and the next backward (call after `init_distributed`)."""
    from sora_train.config import DataConfig, TrainConfig, TrainLoopConfig
    from sora_train.diffusion.flow import flow_loss
    from sora_train.loop.engine import batch_layout, training_engine

    cfg = TrainConfig(
        model=preset("tiny"), data=DataConfig(train="unused", num_frames=4, height=16, width=16),
        train=TrainLoopConfig(global_batch_size=2, precision=precision), run_dir="unused",
    )  # fmt: skip
    cfg.parallel.zero_stage = 2
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(0)
    engine = training_engine(build_denoiser(cfg.model), cfg, batch_layout(cfg, 1))
    ids, mask = build_tokenizer(cfg.model)(["a red square", "a blue circle"])
    x0, noise = torch.randn(2, 3, 4, 16, 16).to(dtype), torch.randn(2, 3, 4, 16, 16).to(dtype)
    t = torch.rand(2).to(dtype)
    for _ in range(2):  # after the second backward: optimizer states (from step 1) and gradients exist
        engine.backward(flow_loss(lambda x_t, t_: engine(x_t, t_, ids, mask), x0, noise, t))
        nbytes = engine_tensors(engine)
        engine.step()
    return nbytes


def engine_tensors(engine) -> int:
    """Bytes of a ZeRO-1/2 engine's module parameters and gradients, flat bf16 groups, fp32 partitions
    and their gradients, averaged gradients, reduction buckets and optimizer-state tensors (unique storages)."""
    zero = engine.optimizer
    tensors = [*engine.module.parameters(), *(p.grad for p in engine.module.parameters())]
    tensors += [*zero.bit16_groups_flat, *zero.single_partition_of_fp32_groups]
    tensors += [p.grad for p in zero.single_partition_of_fp32_groups]
    tensors += [g for grads in zero.averaged_gradients.values() for g in grads]
    tensors += [b for bucket in zero.ipg_buckets.values() for b in bucket.buffer]
    tensors += [v for state in zero.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return sum(_storage_bytes(tensors).values())


def gpu_peak(policy: str) -> dict[str, float]:
    """torch.cuda.max_memory_allocated over one training step (DeepSpeed ZeRO-2, EMA) and the plan's peak."""
    from sora_train.diffusion.flow import flow_loss
    from sora_train.ema import EMA
    from sora_train.loop.engine import batch_layout, training_engine
    from sora_train.parallel.checkpointing import apply_activation_checkpointing
    from sora_train.parallel.dist import init_distributed, shutdown_distributed

    cfg = compose_config([*GPU_OVERRIDES, f"train.activation_checkpointing={policy}"])
    info = init_distributed()
    torch.cuda.reset_peak_memory_stats()
    model = build_denoiser(cfg.model)
    apply_activation_checkpointing(model, policy)
    engine = training_engine(model, cfg, batch_layout(cfg, 1))
    ema = EMA(engine.module, cfg.train.ema_decay)
    device, dtype = info.device, torch.bfloat16
    ids, mask = (x.to(device) for x in build_tokenizer(cfg.model)(["a red square moving left"]))
    shape = (1, 3, cfg.data.num_frames, cfg.data.height, cfg.data.width)
    x0, noise = torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype)
    t = torch.rand(1, device=device, dtype=dtype)
    engine.backward(flow_loss(lambda x_t, t_: engine(x_t, t_, ids, mask), x0, noise, t))
    engine.step()
    ema.update(engine.module)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated()
    spec = match_device_name(torch.cuda.get_device_name())
    plan = plan_run(cfg, 1, spec.name if spec else "H100")
    shutdown_distributed()
    bucket = plan.buckets[0]
    return {
        "measured": measured, "planned": bucket.peak_bytes, "states": plan.states.persistent,
        "activations": bucket.activation_bytes, "transient": bucket.transient_bytes, "policy": policy,
        "device": torch.cuda.get_device_name(),
    }  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1] == "engine-states":
        from sora_train.parallel.dist import init_distributed, shutdown_distributed

        init_distributed()
        print(json.dumps({precision: engine_state_bytes(precision) for precision in ("fp32", "bf16")}))
        shutdown_distributed()
    elif sys.argv[1] == "gpu-peak":
        print(json.dumps(gpu_peak(sys.argv[2])))
    else:
        raise SystemExit(f"unknown measurement {sys.argv[1]!r}")


def test_zero3_fetches_a_parameter_larger_than_the_prefetch_bucket_whole():
    """Wan 14B's FFN weight (13824 × 5120 = 70.8M elements) is larger than the default 5e7 bucket:
    the bucket and the live-parameter limit are raised to it, never lowered."""
    from sora_train.parallel.zero import zero3_fetch_sizes, zero_config

    parallel = ParallelConfig(zero_stage=3)
    ffn = 13824 * 5120
    assert zero3_fetch_sizes(parallel, ffn) == (ffn, parallel.max_live_parameters)
    assert zero3_fetch_sizes(parallel, 1000) == (parallel.prefetch_bucket_size, parallel.max_live_parameters)
    section = zero_config(parallel, on_gpu=False, largest_parameter=ffn)
    assert section["stage3_prefetch_bucket_size"] == ffn
    assert zero_config(ParallelConfig(zero_stage=2), on_gpu=False, largest_parameter=ffn)["stage"] == 2
