"""Fine-tuning a released Wan transformer end to end, with tiny random ones made by diffusers at test
time: 2 processes, ZeRO-3 (built partitioned, weights streamed from rank 0), an exact resume, export
to diffusers and the original layout, and diffusers loading and running the export; then LoRA:
adapters only, an exact resume, and the adapters loaded into a diffusers `WanPipeline`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sora_train.checkpoint.safe_load import weights_only_loads
from sora_train.checkpoint.store import tag_for
from sora_train.metrics import read_metrics

from .conftest import assert_ok, run_module, run_train
from .tiny_pretrained import save_tiny_t5, save_tiny_wan

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# The tiny Wan both sides agree on: 2 heads of 8, 2 blocks, FFN 32, patches 1x2x2, pixel space
# (3 channels), captions from a tiny frozen umT5 (32 wide), as a released Wan reads umT5-XXL's.
WAN = {"num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2, "ffn_dim": 32, "freq_dim": 16,
       "patch_size": (1, 2, 2), "in_channels": 3, "out_channels": 3, "text_dim": 32}  # fmt: skip
MODEL = [
    "model.variant=wan", "model.hidden_size=16", "model.num_heads=2", "model.depth=2", "model.ffn_dim=32",
    "model.freq_dim=16", "model.patch_size=[1,2,2]", "model.text_dim=32",
    "model.text_encoder=umt5", "model.text_max_length=8", "model.absolute_positions=false",
]  # fmt: skip
RUN = [
    "data.num_frames=4", "data.height=16", "data.width=16", "data.shuffle_buffer=16", "data.num_workers=0",
    "wandb.mode=disabled", "train.log_every=1", "diffusion.sample_steps=2", "optim.warmup_steps=1",
    "train.global_batch_size=4", "train.max_steps=4", "checkpoint.every=2", "eval.val_batches=1",
    "launch.nproc_per_node=2", "train.sample_prompts=[a red square moving left on a black background]",
]  # fmt: skip


def save_tiny_diffusers_wan(path: Path, **overrides) -> Path:
    """A random `WanTransformer3DModel` (non-zero everywhere, as released weights are) saved to `path`."""
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**{**WAN, **overrides})
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def umt5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random umT5 encoder and its tokenizer, 32 wide."""
    path = tmp_path_factory.mktemp("umt5")
    save_tiny_t5("umt5", path)
    return path


def run_args(corpus: Path, umt5: Path, source: Path) -> list[str]:
    return [*MODEL, *RUN, f"data.train={corpus / 'train'}", f"data.val={corpus / 'val'}",
            f"model.text_encoder_path={umt5}", f"model.init_from={source}"]  # fmt: skip


def steps_of(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run) if "loss" in r}


def train_then_resume(args: list[str], tmp_path: Path) -> tuple[Path, Path]:
    """4 steps, then a copy resumed from its step-2 checkpoint; both run dirs."""
    run_dir, resumed = tmp_path / "run", tmp_path / "resumed"
    assert_ok(run_train(*args, f"run_dir={run_dir}"))
    shutil.copytree(run_dir, resumed)
    shutil.rmtree(resumed / "checkpoints" / tag_for(4))
    assert_ok(run_train(*args, f"run_dir={resumed}"))
    for step in (3, 4):
        assert steps_of(resumed)[step]["loss"] == steps_of(run_dir)[step]["loss"], step
    final = Path("checkpoints") / tag_for(4) / "ema.safetensors"
    assert (resumed / final).read_bytes() == (run_dir / final).read_bytes()
    return run_dir, resumed


def test_zero3_fine_tunes_a_diffusers_wan_resumes_exactly_and_exports_what_diffusers_runs(
    corpus, umt5, tmp_path
):
    source = save_tiny_diffusers_wan(tmp_path / "released")
    args = [*run_args(corpus, umt5, source), "parallel=zero3"]
    run_dir, _ = train_then_resume(args, tmp_path)
    first = steps_of(run_dir)[1]["loss"]
    reference = diffusers.WanTransformer3DModel.from_pretrained(source)

    out = tmp_path / "export"
    assert_ok(run_module("sora_train.export", str(run_dir), "--out", str(out), "--format", "diffusers"))
    exported = diffusers.WanTransformer3DModel.from_pretrained(out).eval()
    ema = load_file(run_dir / "checkpoints" / tag_for(4) / "ema.safetensors")
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, ema[f"dit.{name}"]), name
    assert any(not torch.equal(t, reference.state_dict()[n]) for n, t in exported.state_dict().items())
    x, text = torch.randn(1, 3, 4, 16, 16), torch.randn(1, 7, 32)
    with torch.no_grad():
        assert torch.isfinite(exported(x, torch.tensor([500.0]), text, return_dict=False)[0]).all()
    assert first > 0

    wan = tmp_path / "export_wan"
    assert_ok(run_module("sora_train.export", str(run_dir), "--out", str(wan), "--format", "wan"))
    assert json.loads((wan / "config.json").read_text())["dim"] == 16


def test_a_run_at_lr_zero_exports_exactly_the_weights_it_started_from(corpus, umt5, tmp_path):
    source = save_tiny_diffusers_wan(tmp_path / "released")
    run_dir = tmp_path / "run"
    args = [*run_args(corpus, umt5, source), "parallel=zero3", "optim.lr=0", "train.max_steps=2"]
    assert_ok(run_train(*args, f"run_dir={run_dir}"))
    out = tmp_path / "export"
    assert_ok(run_module("sora_train.export", str(run_dir), "--out", str(out), "--format", "diffusers"))
    original = diffusers.WanTransformer3DModel.from_pretrained(source).state_dict()
    again = diffusers.WanTransformer3DModel.from_pretrained(out).state_dict()
    assert original.keys() == again.keys()
    for name in original:
        assert torch.equal(original[name], again[name]), name


def test_lora_trains_adapters_only_resumes_exactly_and_loads_into_a_wan_pipeline(corpus, umt5, tmp_path):
    source = save_tiny_diffusers_wan(tmp_path / "released")
    args = [*run_args(corpus, umt5, source), "parallel=zero2", "model.lora.rank=4", "model.lora.alpha=8",
            "optim.lr=1e-2"]  # fmt: skip
    run_dir, _ = train_then_resume(args, tmp_path)
    checkpoint = run_dir / "checkpoints" / tag_for(4)
    ema = load_file(checkpoint / "ema.safetensors")
    assert ema and all(".lora_" in name for name in ema)  # the checkpoint holds the adapters only
    with weights_only_loads():
        module = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu")["module"]
    assert set(module) == set(ema)  # DeepSpeed's copy too: no frozen base weight

    lora_dir = tmp_path / "lora"
    assert_ok(run_module("sora_train.export", str(run_dir), "--out", str(lora_dir), "--format", "diffusers"))
    wrong = run_module("sora_train.export", str(run_dir), "--out", str(tmp_path / "w"), "--format", "wan")
    assert wrong.returncode == 2 and "add --merge" in wrong.stderr and not (tmp_path / "w").exists()
    merged_dir = tmp_path / "merged"
    assert_ok(run_module("sora_train.export", str(run_dir), "--out", str(merged_dir), "--format", "diffusers",
                         "--merge"))  # fmt: skip

    pipeline = tiny_pipeline(source, tmp_path)
    pipeline.load_lora_weights(str(lora_dir))
    merged = diffusers.WanTransformer3DModel.from_pretrained(merged_dir).eval()
    generator = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 3, 2, 8, 8, generator=generator), torch.randn(1, 5, 32, generator=generator)
    with torch.no_grad():
        adapted = pipeline.transformer(x, torch.tensor([300.0]), text, return_dict=False)[0]
        folded = merged(x, torch.tensor([300.0]), text, return_dict=False)[0]
    torch.testing.assert_close(adapted, folded, rtol=0, atol=1e-5)


def tiny_pipeline(transformer_dir: Path, tmp_path: Path):
    """A `WanPipeline` of tiny random parts around the released transformer (for load_lora_weights)."""
    transformers = pytest.importorskip("transformers")
    vae_dir, text_dir = tmp_path / "vae", tmp_path / "pipe_umt5"
    save_tiny_wan(vae_dir)
    save_tiny_t5("umt5", text_dir)
    return diffusers.WanPipeline(
        transformer=diffusers.WanTransformer3DModel.from_pretrained(transformer_dir).eval(),
        vae=diffusers.AutoencoderKLWan.from_pretrained(vae_dir),
        text_encoder=transformers.UMT5EncoderModel.from_pretrained(text_dir),
        tokenizer=transformers.AutoTokenizer.from_pretrained(text_dir),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def test_lora_targets_that_match_nothing_stop_before_anything_is_written(corpus, umt5, tmp_path):
    source = save_tiny_diffusers_wan(tmp_path / "released")
    run_dir = tmp_path / "run"
    args = [*run_args(corpus, umt5, source), "model.lora.rank=4", "model.lora.targets=[dit\\.nothing]"]
    result = run_train(*args, f"run_dir={run_dir}")
    assert result.returncode == 2 and not any(run_dir.glob("*"))  # Hydra's empty run dir at most
    assert result.stderr.strip().splitlines()[-1] == (
        "error: model.lora.targets ['dit\\\\.nothing'] match no Linear module of the model"
    )


def test_wan_composes_with_sequence_parallelism_frame_conditioning_and_checkpointing(corpus, umt5, tmp_path):
    """The trainer's other features with the Wan variant: Ulysses SP over both ranks, Wan 2.2's
    frame conditioning (clean frames at timestep 0), selective activation checkpointing, ZeRO-1."""
    source = save_tiny_diffusers_wan(tmp_path / "released")
    run_dir = tmp_path / "run"
    args = [*run_args(corpus, umt5, source), "parallel=zero1", "parallel.sequence_parallel=2",
            "train.global_batch_size=2", "train.max_steps=2", "train.activation_checkpointing=selective",
            "model.frame_conditioning=true", "diffusion.conditioning.none=0.5", "diffusion.conditioning.first=0.5"]  # fmt: skip
    assert_ok(run_train(*args, f"run_dir={run_dir}"))
    rows = steps_of(run_dir)
    assert sorted(rows) == [1, 2] and all(row["tflops_per_device"] > 0 for row in rows.values())
    (layout,) = [r for r in read_metrics(run_dir) if r.get("event") == "layout"]
    assert (layout["data_parallel"], layout["sequence_parallel"]) == (1, 2)


def test_bf16_lora_under_zero3_from_released_weights_validates_samples_and_exports(corpus, umt5, tmp_path):
    """The conditions users train in at once: bf16, ZeRO-3 built partitioned, released weights, LoRA."""
    source = save_tiny_diffusers_wan(tmp_path / "released")
    run_dir = tmp_path / "run"
    args = [*run_args(corpus, umt5, source), "parallel=zero3", "train.precision=bf16", "model.lora.rank=4",
            "train.max_steps=2"]  # fmt: skip
    assert_ok(run_train(*args, f"run_dir={run_dir}"))
    assert [e["step"] for e in read_metrics(run_dir) if e.get("event") == "validation"] == [2]
    assert [e for e in read_metrics(run_dir) if e.get("event") == "samples"]
    ema = load_file(run_dir / "checkpoints" / tag_for(2) / "ema.safetensors")
    assert ema and all(".lora_" in name and t.dtype == torch.float32 for name, t in ema.items())
    out = tmp_path / "lora"
    assert_ok(run_module("sora_train.export", str(run_dir), "--out", str(out), "--format", "diffusers"))
    assert (out / "pytorch_lora_weights.safetensors").is_file()
