"""The end of big runs: which evaluations a run affords (`sora_train/eval/affordable.py`), validation
and samples in the sharded layout under ZeRO-3 (`sora_train/loop/averaged.py`), and
experiment=minute_720p scaled down, end to end on 2 CPU processes with its peak host memory checked
against the planner.

Run as a module under torchrun (`-m tests.test_end_of_run OUT`) this file is the 2-rank worker of
`test_sharded_evaluation_equals_a_replica_and_gives_the_weights_back`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from sora_train.checkpoint.store import tag_for
from sora_train.compose import compose_config
from sora_train.config import TrainConfig
from sora_train.eval.affordable import GIB, Evaluation, plan_evaluation, report_evaluation
from sora_train.loop.sampler import SAMPLE_WAIT_S, Sampler
from sora_train.metrics import MetricsLogger, read_metrics
from sora_train.planning.plan import plan_run

from .conftest import FAST, assert_ok, run_module, run_python, run_train
from .tiny_pretrained import save_tiny_wan

# ---------------------------------------------------------------------------------------------
# Which evaluations a run affords


def recipe(*overrides: str) -> TrainConfig:
    """A composed config (not validated: nothing is read from disk)."""
    return compose_config(["data.train=unused", "data.val=unused", "run_dir=unused", *overrides])


MINUTE = ("experiment=minute_720p",)  # 1B, ZeRO-3, SP 6, 2 prompts, 25 sampling steps with guidance
LIMIT_PARAMETERS = 8 * GIB // 2  # a bf16 replica of exactly eval.max_replica_gib's default, 8 GiB


def test_zero3_validates_and_samples_sharded_whatever_the_model_size():
    """No whole model is built under ZeRO-3, so neither the 1B recipe nor a 14B model skips anything."""
    for overrides, parameters, world in ((MINUTE, 1_022_812_224, 48), ((*MINUTE, "model=14B"), 14.3e9, 64)):
        evaluation = plan_evaluation(recipe(*overrides), int(parameters), world, compute_bytes=2)
        assert evaluation.layout == "sharded" and evaluation.skipped == ()
        assert evaluation.validate and evaluation.sample and not evaluation.synthetic
    # one clip per group of 6 ranks: 25 steps x 2 (guidance) forwards, a third of a training
    # sample's FLOPs each, against one clip per group per step: 50 / 3 steps
    assert plan_evaluation(recipe(*MINUTE), 10**9, 48, 2).sample_cost_steps == pytest.approx(50 / 3)


@pytest.mark.parametrize("compute_bytes", [2, 4])
def test_a_replica_above_the_limit_skips_validation_and_samples_and_says_how_to_force_them(compute_bytes):
    cfg = recipe("parallel=zero2")  # the tiny model, its parameters given to the rule
    parameters = LIMIT_PARAMETERS * 2 // compute_bytes  # exactly 8 GiB in the compute dtype
    at_limit = plan_evaluation(cfg, parameters, 2, compute_bytes)
    assert at_limit.layout == "replica" and at_limit.skipped == () and at_limit.validate and at_limit.sample
    above = plan_evaluation(cfg, parameters + 1, 2, compute_bytes)
    assert not above.validate and not above.sample
    reasons = dict(above.skipped)
    assert list(reasons) == ["validation", "samples"]
    dtype = "bf16" if compute_bytes == 2 else "fp32"
    assert reasons["validation"] == (
        f"validation skipped: it builds a whole EMA model of {parameters / 1e9:.2f}B parameters, 8.0 GiB in "
        f"{dtype}, above eval.max_replica_gib=8 (ZeRO-3 validates and samples sharded, without one); set "
        "eval.max_replica_gib=0 (no limit) or above 9 to run it"
    )
    for forced in ("eval.max_replica_gib=0", "eval.max_replica_gib=9"):
        again = plan_evaluation(recipe("parallel=zero2", forced), parameters + 1, 2, compute_bytes)
        assert again.skipped == () and again.validate and again.sample, forced


def test_the_synthetic_evaluation_still_needs_a_replica_under_zero3():
    cfg = recipe(*MINUTE, "eval.synthetic=true")
    evaluation = plan_evaluation(cfg, LIMIT_PARAMETERS + 1, 48, 2)
    assert evaluation.validate and evaluation.sample and not evaluation.synthetic
    assert [what for what, _ in evaluation.skipped] == ["eval.synthetic"]
    assert plan_evaluation(cfg, LIMIT_PARAMETERS, 48, 2).synthetic


def test_samples_costing_more_training_steps_than_the_limit_are_skipped():
    """The 1B recipe under ZeRO-2: rank 0 alone samples both clips, 2 x 50 forwards of a third of a
    sample each, against one sample over 6 ranks per step: 200 steps, above the default 100."""
    evaluation = plan_evaluation(recipe(*MINUTE, "parallel=zero2"), 10**9, 48, 2)
    assert evaluation.sample_cost_steps == pytest.approx(200)
    assert evaluation.validate and not evaluation.sample
    assert dict(evaluation.skipped)["samples"] == (
        "samples skipped: 2 clips of 961x720x1280 (all on rank 0) cost a rank 200 training steps of compute, "
        "above eval.max_sample_cost_steps=100; set eval.max_sample_cost_steps=0 (no limit) or above 200 to "
        "sample anyway"
    )
    for forced in ("eval.max_sample_cost_steps=0", "eval.max_sample_cost_steps=200"):
        assert plan_evaluation(recipe(*MINUTE, "parallel=zero2", forced), 10**9, 48, 2).sample, forced
    unguided = plan_evaluation(recipe(*MINUTE, "parallel=zero2", "diffusion.cfg_scale=1.0"), 10**9, 48, 2)
    assert unguided.sample_cost_steps == pytest.approx(100) and unguided.sample  # one forward per step
    quiet = plan_evaluation(recipe(*MINUTE, "parallel=zero2", "train.sample_prompts=[]"), 10**9, 48, 2)
    assert quiet.sample_cost_steps == 0 and not quiet.sample and quiet.skipped == ()


def test_small_runs_evaluate_as_before_and_the_plan_is_reported(tmp_path, capsys):
    small = plan_evaluation(recipe("eval.synthetic=true"), 2_500_000, 2, 4)
    assert (small.layout, small.validate, small.sample, small.synthetic, small.skipped) == (
        "replica", True, True, True, ()
    )  # fmt: skip
    cfg = replace(recipe(*MINUTE, "parallel=zero2", "wandb.mode=disabled"), run_dir=str(tmp_path))
    evaluation = plan_evaluation(cfg, LIMIT_PARAMETERS + 1, 48, 2)
    logger = MetricsLogger(cfg, 0, None)
    report_evaluation(logger, evaluation, 0)
    logger.close()
    printed = capsys.readouterr().out.splitlines()
    assert printed == [why for _, why in evaluation.skipped] and len(printed) == 2
    (event,) = read_metrics(tmp_path)
    assert event["event"] == "evaluation_plan" and event["layout"] == "replica"
    assert set(event["skipped"]) == {"validation", "samples"} and not event["validate"]
    assert event["replica_gib"] == pytest.approx(8.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# The sharded layout on 2 ranks


def _batch(seed: int) -> dict:
    """One held-out batch of one 4x16x16 clip in the FAST settings' pixel space."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (1, 3, 4, 16, 16), dtype=torch.uint8, generator=generator)
    return {
        "x": x,
        "caption": [f"a red square {seed}"],
        "key": [f"clip{seed}"],
        "bucket": "4x16x16",
        "epoch": 0,
    }


def _trained_engine(cfg: TrainConfig, info, prompts):
    """A ZeRO-3 engine of `cfg`'s model after two steps on this rank's batches, and its EMA (decay
    0.5: it lags the weights)."""
    from sora_train.data.decode import to_unit_range
    from sora_train.diffusion.flow import flow_loss
    from sora_train.ema import EMA
    from sora_train.loop.engine import batch_layout, training_engine
    from sora_train.models.denoiser import build_denoiser

    torch.manual_seed(0)
    engine = training_engine(build_denoiser(cfg.model), cfg, batch_layout(cfg, info.data_world))
    ema = EMA(engine.module, decay=0.5)
    for step in (1, 2):
        batch = _batch(100 * step + info.rank)
        x0, (ids, mask) = to_unit_range(batch["x"], torch.float32), prompts(batch["caption"])
        noise, t = torch.randn_like(x0), torch.rand(1)
        engine.backward(flow_loss(lambda x_t, t_: engine(x_t, t_, ids, mask), x0, noise, t))  # noqa: B023
        engine.step()
        ema.update(engine.module)
    return engine, ema


def sharded_check(out: str) -> None:
    """The worker: ZeRO-3 (fp32, weight matrices partitioned) on 2 data-parallel ranks, two steps so
    the EMA differs from the weights, then rank 0 validates 3 batches and rank 1 none, in the sharded
    layout and with a replica; one clip both ways; the samples of 3 prompts over the 2 groups."""
    from sora_train.loop.averaged import AveragedWeights
    from sora_train.loop.sampler import sample_clip, sharded_samples
    from sora_train.loop.validator import Validator
    from sora_train.models.prompts import PromptEncoder
    from sora_train.models.vae import PixelSpace
    from sora_train.parallel.dist import init_distributed, shutdown_distributed

    info = init_distributed()
    cfg = compose_config([
        *FAST, "parallel=zero3", "parallel.param_persistence_threshold=64", "train.precision=fp32", "data.train=unused",
        "train.global_batch_size=2", "optim.lr=0.05", f"run_dir={out}", "train.sample_prompts=[a red square,a blue circle,a cat]",
    ])  # fmt: skip
    prompts = PromptEncoder(cfg.model, info.device, torch.float32)
    engine, ema = _trained_engine(cfg, info, prompts)
    averaged = AveragedWeights(ema, engine, cfg, info, torch.float32)
    validator = Validator(cfg, info, averaged, prompts, PixelSpace(), 1, None)
    assert validator.lockstep_sums(engine.module, []) == {}  # no rank holds a batch: nothing runs
    mine = [_batch(seed) for seed in range(3)] if info.rank == 0 else []
    params = list(engine.module.parameters())
    before = [(p.ds_tensor.clone(), p.data.clone()) for p in params]
    training_weights = validator.lockstep_sums(engine.module, mine)
    with averaged.everywhere() as model:
        held = sum(p.data.numel() for p in model.parameters())
        sharded = validator.lockstep_sums(model, mine)
        sharded_clip = sample_clip(model, cfg, 1)
        paths = sharded_samples(model, cfg, info, step=2)
        training_mode = model.training
    replica = averaged.replica(everywhere=True)
    report = {
        "sharded": sharded, "replica": validator.loss_sums(replica, mine), "training_weights": training_weights,
        "clip_gap": int(np.abs(sharded_clip.astype(int) - sample_clip(replica, cfg, 1).astype(int)).max()),
        "held": held, "whole": sum(p.ds_numel for p in params), "paths": [str(p) for p in paths],
        "restored": all(
            torch.equal(p.ds_tensor, t) and torch.equal(p.data, d) for p, (t, d) in zip(params, before, strict=True)
        ),
        "training_mode": [training_mode, engine.module.training],
    }  # fmt: skip
    Path(f"{out}.{info.rank}.json").write_text(json.dumps(report))
    engine.destroy()
    shutdown_distributed()


@pytest.mark.distributed
def test_sharded_evaluation_equals_a_replica_and_gives_the_weights_back(tmp_path):
    out = tmp_path / "report"
    assert_ok(run_module("torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                         "tests.test_end_of_run", str(out), timeout=180))  # fmt: skip
    reports = [json.loads(Path(f"{out}.{rank}.json").read_text()) for rank in (0, 1)]
    zero, one = reports
    assert set(zero["sharded"]) == {"4x16x16"} and zero["sharded"]["4x16x16"][1] == 3  # 3 clips counted
    assert one["sharded"] == one["replica"] == {}  # rank 1 ran borrowed copies in step, counted none
    loss, reference = zero["sharded"]["4x16x16"][0], zero["replica"]["4x16x16"][0]
    assert loss == pytest.approx(reference, rel=1e-6)  # the EMA weights, sharded = whole
    assert abs(zero["training_weights"]["4x16x16"][0] - loss) > 1e-3  # not the training weights
    for report in reports:
        assert report["clip_gap"] <= 1  # the same clip from the sharded model and a replica (uint8)
        assert report["restored"] and report["training_mode"] == [False, True]
        assert report["held"] < report["whole"] / 10  # no rank holds the model: its partition and the vectors
        assert [Path(p).name[:3] for p in report["paths"]] == ["00_", "01_", "02_"]
        assert all(Path(p).is_file() for p in report["paths"])


# ---------------------------------------------------------------------------------------------
# experiment=minute_720p, scaled down, end to end


@pytest.fixture(scope="module")
def tiny_latents(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One train and one val shard of the synthetic corpus encoded at 9x36x64 with a tiny random Wan VAE
    (2x time and space compression, 4 channels): {"train", "val", "vae"}."""
    from sora_train.data_prep.cli import main as prep_main

    from sora_train.data.storage import resolve_shards

    root = tmp_path_factory.mktemp("minute_tiny")
    vae = save_tiny_wan(root / "wan")
    table = root / "table.yaml"
    table.write_text(json.dumps({"stride": 1, "buckets": [{"frames": 9, "height": 36, "width": 64}]}))
    paths = {"vae": vae}
    for split in ("train", "val"):
        shard = resolve_shards(str(corpus / split))[0]
        out = root / split
        assert prep_main(["encode", "--src", shard, "--out", str(out), "--buckets", str(table),
                          "--latent-space", "wan", "--vae", vae, "--device", "cpu"]) == 0  # fmt: skip
        paths[split] = str(out)
    return paths


# A fresh process that imports what a rank imports (the trainer, DeepSpeed's ZeRO-3, the Wan VAE's
# diffusers and the mp4 writer) and does nothing else: the floor of a rank's host memory on CPU.
# Its VmHWM (`peak_resident_bytes`): ru_maxrss would keep the peak of pytest, which starts it.
IMPORT_FLOOR = """
import av, deepspeed.runtime.zero.stage3, sora_train.cli, sora_train.generate, sora_train.train
from diffusers import AutoencoderKLWan
from sora_train.throughput import peak_resident_bytes
print(peak_resident_bytes())
"""


def planned_host_bytes(cfg: TrainConfig) -> int:
    """The planner's per-rank peak for this run as it runs on CPU, over its 2 ranks: sora-plan's
    figure (states, activations, DeepSpeed's buffers) with `overlap_comm` as the CPU resolves `auto`
    (off: one reduce bucket, not two)."""
    on_cpu = replace(cfg, parallel=replace(cfg.parallel, overlap_comm="false"))
    (bucket,) = plan_run(on_cpu, 2, "H100").buckets  # the GPU type only sets what is usable
    return bucket.peak_bytes


@pytest.mark.distributed
def test_minute_recipe_scaled_down_runs_every_phase_within_the_planned_host_memory(tiny_latents, tmp_path):
    """experiment=minute_720p_tiny on 2 processes: latent shards, ZeRO-3, one sequence-parallel group,
    checkpoints and validation every 2 steps, samples at the end; then its checkpoint resumed on
    1 process, which converts it to a universal checkpoint, trains a step and evaluates again.

    Memory: each rank's peak resident set (VmHWM, the `peak_memory` event at the end) against
    1.2 x (the import floor of a rank, measured in a fresh process, + the planner's per-rank peak).
    """
    data = [f"data.train={tiny_latents['train']}", f"data.val={tiny_latents['val']}",
            f"model.vae_path={tiny_latents['vae']}"]  # fmt: skip
    run_dir = tmp_path / "run"
    assert_ok(run_train("experiment=minute_720p_tiny", *data, f"run_dir={run_dir}", timeout=240))
    rows = read_metrics(run_dir)
    events = {}
    for row in rows:
        events.setdefault(row.get("event"), []).append(row)
    (layout,) = events["layout"]
    assert (layout["data_parallel"], layout["sequence_parallel"], layout["zero_stage"]) == (1, 2, 3)
    (plan,) = events["evaluation_plan"]
    assert plan["layout"] == "sharded" and plan["validate"] and plan["sample"] and plan["skipped"] == {}
    assert [r["step"] for r in events[None]] == [1, 2, 3, 4]
    assert [r["step"] for r in events["checkpoint"]] == [2, 4]
    assert [r["step"] for r in events["validation"]] == [2, 4]
    assert all(0 < r["val_loss"] < 10 for r in events["validation"])
    (samples,) = events["samples"]
    assert len(samples["paths"]) == 1 and Path(samples["paths"][0]).stat().st_size > 0

    floor = run_python("-c", IMPORT_FLOOR)
    assert_ok(floor)
    planned = int(floor.stdout.split()[-1]) + planned_host_bytes(
        compose_config(["experiment=minute_720p_tiny", *data, f"run_dir={run_dir}"])
    )
    (peaks,) = events["peak_memory"]
    assert peaks["kind"] == "host_resident" and len(peaks["bytes_by_rank"]) == 2
    for rank, peak in enumerate(peaks["bytes_by_rank"]):
        assert peak <= 1.2 * planned, f"rank {rank}: {peak / 2**20:.0f} MiB > 1.2 x {planned / 2**20:.0f} MiB"

    resumed = run_train("experiment=minute_720p_tiny", *data, f"run_dir={run_dir}", "launch.nproc_per_node=1",
                        "parallel.sequence_parallel=1", "train.max_steps=5", timeout=240)  # fmt: skip
    assert_ok(resumed)
    assert f"{tag_for(4)} was saved by 2 ranks; converting it for 1" in resumed.stdout
    later = [r for r in read_metrics(run_dir) if r["step"] == 5 or r.get("event") == "resumed"]
    assert [r["event"] for r in later if "event" in r] == [
        "resumed", "checkpoint", "validation", "data", "samples", "peak_memory"
    ]  # fmt: skip
    assert [r["loss"] for r in later if "loss" in r] and (run_dir / "samples" / tag_for(5)).is_dir()


if __name__ == "__main__":
    sharded_check(sys.argv[1])


def test_the_ranks_wait_for_rank_0s_samples_four_times_their_cost_at_the_runs_pace(monkeypatch):
    """Below ZeRO-3 rank 0 samples alone; the others wait for it as long as the samples' cost in
    training steps, four times over at the pace of the run so far, plus a floor."""
    evaluation = Evaluation("replica", True, True, False, 88_832, 355_328, sample_cost_steps=10.0, skipped=())
    sampler = Sampler(TrainConfig(), None, None, None, evaluation)
    assert sampler.rank0_seconds(5) == SAMPLE_WAIT_S  # no step timed yet
    now = iter([1000.0, 1100.0])  # the first step at t=1000, 10 steps later t=1100: 10 s a step
    monkeypatch.setattr("sora_train.loop.sampler.time.monotonic", lambda: next(now))
    sampler.maybe_sample(1)
    assert sampler.rank0_seconds(11) == SAMPLE_WAIT_S + 4 * 10.0 * 10.0
