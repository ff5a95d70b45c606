"""Real torchrun processes over gloo: data-parallel correctness and exact resume."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sora_train.checkpoint.safe_load import weights_only_loads
from sora_train.checkpoint.store import tag_for
from sora_train.config import ModelConfig
from sora_train.flops import sample_flops
from sora_train.launcher import child_pids
from sora_train.metrics import read_metrics
from sora_train.options import dataclass_from_dict
from sora_train.parallel.dist import free_port
from sora_train.preemption import EXIT_PREEMPTED

from .conftest import REPO, assert_ok, run_args, run_module, run_python, run_torchrun, run_train

pytestmark = pytest.mark.distributed
SCRIPTS = Path(__file__).parent / "scripts"
FAKE_SLURM = Path(__file__).parent / "fake_slurm"  # sbatch, srun, scontrol stand-ins


def test_two_process_run_checkpoints(two_process_run):
    rows = [r for r in read_metrics(two_process_run) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 9))
    validations = [r for r in read_metrics(two_process_run) if r.get("event") == "validation"]
    assert [r["step"] for r in validations] == [4, 8]  # every 4 steps and at the end
    by_bucket = validations[-1]["val_loss_by_bucket"]
    assert sorted(by_bucket) == ["4x16x16", "4x16x24", "4x24x16", "all"]
    assert min(by_bucket.values()) <= by_bucket["all"] <= max(by_bucket.values())
    assert validations[-1]["val_loss"] < validations[0]["val_loss"]  # the held-out loss falls
    (index,) = [r for r in read_metrics(two_process_run) if r.get("event") == "data_index"]
    assert index["batch_size_by_bucket"] == {"4x16x16": 3, "4x16x24": 2, "4x24x16": 2}
    assert sum(index["samples_by_bucket"].values()) == 64 and len(index["samples_by_bucket"]) == 3
    # 192 tokens a step (2 ranks × 96) over 6, 5 or 4 clips, depending on the buckets drawn
    tokens_per_clip = {round(r["tokens_per_s"] / r["samples_per_s"], 1) for r in rows}
    assert tokens_per_clip <= {32.0, 38.4, 48.0} and len(tokens_per_clip) > 1
    assert all(len(r["batch_hash"]) == 12 for r in rows)
    assert_throughput_report(two_process_run, rows)
    checkpoints = sorted(p.name for p in (two_process_run / "checkpoints").glob("step_*"))
    assert checkpoints == ["step_0000004", "step_0000008"]
    assert (two_process_run / "checkpoints" / "latest").read_text().strip() == "step_0000008"
    for name in ("rank_00000.pt", "rank_00001.pt", "ema.safetensors", "config.json", "trainer_state.json"):
        assert (two_process_run / "checkpoints" / "step_0000008" / name).is_file(), name
    info = (two_process_run / "run_info.json").read_text()
    assert '"world_size": 2' in info and '"torch"' in info
    assert list((two_process_run / "samples" / "step_0000008").glob("*.mp4"))


def assert_throughput_report(run_dir: Path, rows: list[dict]) -> None:
    """The layout event, and each step's FLOPs: Σ over its clips of the per-sample count (flops.py)."""
    (layout,) = [r for r in read_metrics(run_dir) if r.get("event") == "layout"]
    assert (
        layout["nodes"],
        layout["devices_per_node"],
        layout["data_parallel"],
        layout["sequence_parallel"],
    ) == (1, 2, 2, 1)
    assert layout["tokens_per_step_by_bucket"] == {"4x16x16": 192, "4x16x24": 192, "4x24x16": 192}
    model = dataclass_from_dict(
        ModelConfig, json.loads((run_dir / "run_info.json").read_text())["config"]["model"]
    )
    uniform = 0
    for row in rows:
        clip_tokens = row["tokens_per_s"] / row["samples_per_s"]
        if clip_tokens in (32.0, 48.0):  # every clip of the step from one bucket shape
            clips = round(192 / clip_tokens)
            # the text tokens counted are those the DiT attended to: the micro batch's longest kept
            # caption (synthetic captions are shorter than text_max_length), at least the BOS token
            fewest, most = (
                clips * sample_flops(model, int(clip_tokens), t) for t in (1, model.text_max_length)
            )
            measured = row["tflops_per_device"] * 1e12 * 2 * clips / row["samples_per_s"]
            assert fewest * (1 - 1e-6) <= measured < most, (fewest, measured, most)
            uniform += 1
        assert row["peak_memory_gb"] > 0 and row["eta_s"] >= 0 and "mfu" not in row  # no peak on a CPU
    assert uniform > 0


def launch(
    corpus: Path, run_dir: Path, *extra: str, env: dict | None = None, script: bool = False
) -> subprocess.Popen:
    """Start the reference run's configuration on 2 processes without waiting: through sora-train
    (which starts torchrun), or through launch/torchrun.sh with `script`."""
    log = (run_dir.parent / f"{run_dir.name}.log").open("a")
    if script:
        command = [str(REPO / "launch" / "torchrun.sh"), *run_args(corpus), *extra]
        env = {"PYTHON": sys.executable, "NPROC": "2", "SORA_RUN_DIR": str(run_dir), **(env or {})}
    else:
        command = [
            sys.executable,
            "-m",
            "sora_train.cli",
            *run_args(corpus),
            "launch.nproc_per_node=2",
            f"run_dir={run_dir}",
            *extra,
        ]
    return subprocess.Popen(
        command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
    )


def wait_for_step(run_dir: Path, step: int, process: subprocess.Popen, timeout: float = 240) -> None:
    """Return as soon as metrics.jsonl records `step` (polled every 10 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "metrics.jsonl").exists() and any(
            r.get("step", 0) >= step and "loss" in r for r in read_metrics(run_dir)
        ):
            return
        assert process.poll() is None, f"the run ended (exit {process.returncode}) before step {step}"
        time.sleep(0.01)
    raise TimeoutError(f"no step {step} within {timeout}s")


def trainer_pid(run_dir: Path, rank: int) -> int:
    """The training process of `rank` in the run at `run_dir` (not its decode workers), from /proc."""
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            command = (proc / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if (f"SORA_RUN_DIR={run_dir}".encode() in environ and f"RANK={rank}".encode() in environ
                and b"sora_train.cli" in command and b"torch.distributed.run" not in command):  # fmt: skip
            return int(proc.name)
    raise LookupError(f"no rank {rank} process for {run_dir}")


def assert_same_training(run: Path, reference: Path, steps: range) -> None:
    """Same batches and losses at `steps`, and bitwise-equal final weights, EMA and optimizer shards."""
    mine, theirs = by_step(run), by_step(reference)
    assert sorted(mine) == list(range(1, steps.stop))
    for step in steps:
        assert mine[step]["batch_hash"] == theirs[step]["batch_hash"], step
        assert mine[step]["loss"] == theirs[step]["loss"], step

    def final_validation(run_dir: Path) -> dict:
        return [r for r in read_metrics(run_dir) if r.get("event") == "validation"][-1]

    assert final_validation(run)["val_loss_by_bucket"] == final_validation(reference)["val_loss_by_bucket"]
    final = tag_for(steps.stop - 1)
    for name in (
        "ema.safetensors",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ):
        assert (run / "checkpoints" / final / name).read_bytes() == (
            reference / "checkpoints" / final / name
        ).read_bytes(), name


def by_step(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run) if "loss" in r}


def test_kill_9_of_a_rank_mid_run_then_resume_is_bitwise_exact(two_process_run, corpus, tmp_path):
    run_dir = tmp_path / "killed"
    process = launch(corpus, run_dir)
    wait_for_step(run_dir, 5, process)  # the step-4 checkpoint is committed; step 6 is under way
    os.kill(trainer_pid(run_dir, rank=1), signal.SIGKILL)
    assert process.wait(timeout=120) != 0
    assert max(by_step(run_dir)) < 8, "the run finished before the kill landed"

    resumed = run_train(*run_args(corpus), "launch.nproc_per_node=2", f"run_dir={run_dir}")
    assert_ok(resumed)
    assert f"resumed from {run_dir / 'checkpoints' / tag_for(4)} at step 4" in resumed.stdout
    assert_same_training(run_dir, two_process_run, range(5, 9))


def test_sigusr1_to_the_launch_script_checkpoints_at_the_next_step_requeues_and_the_relaunch_is_exact(
    two_process_run, corpus, tmp_path
):
    run_dir, bin_dir = tmp_path / "preempted", tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    process = launch(corpus, run_dir, "checkpoint.requeue=true", env=slurm, script=True)
    wait_for_step(run_dir, 2, process)
    process.send_signal(signal.SIGUSR1)  # to the launch script, as SLURM's --signal=B:USR1 does
    assert process.wait(timeout=120) == EXIT_PREEMPTED

    (preempted,) = [r for r in read_metrics(run_dir) if r.get("event") == "preempted"]
    stopped = preempted["step"]
    assert 2 <= stopped < 8 and preempted["signals_by_rank"] == [signal.SIGUSR1] * 2
    assert max(by_step(run_dir)) == stopped  # no step after the agreed boundary
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == tag_for(stopped)
    assert (tmp_path / "scontrol.log").read_text().splitlines() == ["requeue 4242"]
    assert json.loads((run_dir / "preempted.json").read_text())["step"] == stopped

    resumed = run_train(*run_args(corpus), "launch.nproc_per_node=2", f"run_dir={run_dir}")
    assert_ok(resumed)
    assert f"at step {stopped}" in resumed.stdout and not (run_dir / "preempted.json").exists()
    assert_same_training(run_dir, two_process_run, range(stopped + 1, 9))


def slurm_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a job under the stand-ins for sbatch, srun and scontrol (job id 777)."""
    return {
        **os.environ, "PATH": f"{FAKE_SLURM}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_LOG": str(tmp_path / "slurm.log"),
        "FAKE_SLURM_JOB_ID": "777", "PYTHON": sys.executable, "NPROC": "1", "RDZV_PORT": str(free_port()),
        "SORA_LAUNCHER": str(REPO / "launch" / "torchrun.sh"),
    }  # fmt: skip


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, breadth first."""
    found, queue = [], child_pids(pid)
    while queue:
        found.append(queue.pop(0))
        queue.extend(child_pids(found[-1]))
    return found


def deliver(job: subprocess.Popen, delivery: str, number: int) -> list[int]:
    """Send `number` the way SLURM would: to the batch shell (`--signal=B:`, which passes it to srun),
    to every process of the step (`--signal=` without B:, and preemption), or to the launchers only.
    Returns the pids signalled."""
    (srun,) = child_pids(job.pid)
    if delivery == "batch shell":
        pids = [job.pid]
    elif delivery == "every process of the step":
        pids = descendants(srun)
    else:
        pids = [
            p for p in descendants(srun) if b"sora_train.launcher" in Path(f"/proc/{p}/cmdline").read_bytes()
        ]
    for pid in pids:
        os.kill(pid, number)
    return pids


@pytest.mark.parametrize(
    "delivery, number",
    [("batch shell", signal.SIGUSR1), ("every process of the step", signal.SIGUSR1),
     ("launchers only", signal.SIGUSR1), ("every process of the step", signal.SIGTERM)],
)  # fmt: skip
def test_slurm_job_on_two_fake_nodes_checkpoints_requeues_once_and_exits_75_however_the_signal_arrives(
    two_process_run, corpus, tmp_path, delivery, number
):
    """launch/slurm.sbatch under stand-ins for sbatch, srun and scontrol: 2 "nodes" × 1 process here.

    Each node runs launch/torchrun.sh → the launcher → a training process → its decode worker. The
    requeued job of the first case resumes exactly.
    """
    env, log = slurm_env(tmp_path), tmp_path / "slurm.log"
    # one thread per process, as in the reference (2 processes on 2 cores): the same arithmetic, bit for bit
    overrides = [*run_args(corpus), "train.threads_per_rank=1"]
    command = ["sbatch", "--nodes=2", str(REPO / "launch" / "slurm.sbatch"), *overrides]
    run_dir = tmp_path / "runs" / "slurm-777"  # the job id's run dir, the same after the requeue
    with (tmp_path / "job.out").open("w") as out:
        job = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
        wait_for_step(run_dir, 2, job)
        signalled = deliver(job, delivery, number)
        code = job.wait(timeout=180)
    output = (tmp_path / "job.out").read_text()
    assert code == EXIT_PREEMPTED, output[-3000:]
    if delivery == "every process of the step":  # 2 × (torchrun.sh, launcher, trainer, decode worker)
        assert len(signalled) >= 8, signalled
    assert "shutting down workers" not in output  # torchrun's own SIGTERM handling never ran
    (preempted,) = [r for r in read_metrics(run_dir) if r.get("event") == "preempted"]
    stopped = preempted["step"]
    assert preempted["signals_by_rank"] == [number] * 2 and max(by_step(run_dir)) == stopped
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == tag_for(stopped)
    assert json.loads((run_dir / "preempted.json").read_text())["step"] == stopped
    calls = log.read_text().splitlines()
    assert calls[:2] == [f"sbatch --nodes=2 {REPO / 'launch' / 'slurm.sbatch'}", calls[1]]
    assert calls[1].startswith("srun 2 tasks: bash -c")
    assert [c for c in calls if c.startswith("scontrol")] == ["scontrol requeue 777"]  # exactly one
    if delivery != "batch shell" or number != signal.SIGUSR1:
        return
    requeued = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert requeued.returncode == 0, requeued.stdout[-3000:] + requeued.stderr[-3000:]
    assert f"at step {stopped}" in requeued.stdout
    assert [c for c in log.read_text().splitlines() if c.startswith("scontrol")] == ["scontrol requeue 777"]
    assert_same_training(run_dir, two_process_run, range(stopped + 1, 9))


def keys_by_step(run: Path) -> dict[int, list[str]]:
    """The sample keys each step trained on (`train.log_keys`)."""
    return {r["step"]: r["keys"] for r in read_metrics(run) if r.get("event") == "keys"}


def test_two_ranks_to_one_and_back_keeps_every_batch_of_the_epoch(two_process_run, corpus, tmp_path):
    """2 ranks (steps 1-4) → 1 rank with 2 accumulation steps (5-6) → 2 ranks (7-8), through universal checkpoints."""
    run_dir = tmp_path / "elastic"
    shutil.copytree(two_process_run, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / tag_for(8))
    one = run_train(*run_args(corpus), "checkpoint.every=2", f"run_dir={run_dir}", "train.max_steps=6")
    assert_ok(one)
    assert "saved by 2 ranks; converting it for 1 (grad_accum_steps=2)" in one.stdout
    state = json.loads((run_dir / "checkpoints" / tag_for(6) / "trainer_state.json").read_text())
    # the run keeps the accumulation the resume derived; the config it records is the one it was given
    assert state["grad_accum_steps"] == 2 and state["config"]["train"]["grad_accum_steps"] == 1
    two = run_train(*run_args(corpus), "checkpoint.every=2", f"run_dir={run_dir}", "launch.nproc_per_node=2")
    assert_ok(two)
    assert "saved by 1 ranks; converting it for 2 (grad_accum_steps=1)" in two.stdout
    assert (run_dir / "checkpoints" / f"{tag_for(4)}.universal").is_dir()

    elastic, reference = keys_by_step(run_dir), keys_by_step(two_process_run)
    assert sorted(elastic) == list(range(1, 9))
    for step in range(1, 9):  # the same samples in every step, whatever the number of ranks
        assert sorted(elastic[step]) == sorted(reference[step]), step
    seen = [key for step in range(1, 9) for key in elastic[step]]
    assert len(seen) == len(set(seen))  # within the epoch: nothing repeated (and, above, nothing lost)
    mine, theirs = by_step(run_dir), by_step(two_process_run)
    for step in (5, 6):  # each sample's draws follow its key and the step: the same losses on 1 rank
        assert mine[step]["loss"] == pytest.approx(theirs[step]["loss"], rel=1e-5), step
    for step in (7, 8):  # train.max_steps=6 compressed the LR schedule of step 6's update: close
        assert abs(mine[step]["loss"] - theirs[step]["loss"]) < 0.05 * theirs[step]["loss"], step


def test_a_steps_loss_is_the_same_for_every_layout_of_the_same_global_batch(
    two_process_run, corpus, tmp_path
):
    """DP=2 (the module's run), SP=2 accumulating 2 micro-batches and one process accumulating 2 train
    on the same global batches with the same per-sample noise, timesteps and caption dropout: equal
    losses at every step."""
    layouts = {
        "sp2": ["launch.nproc_per_node=2", "parallel.sequence_parallel=2", "train.grad_accum_steps=2"],
        "accumulate2": ["train.grad_accum_steps=2"],
    }
    reference, reference_keys = by_step(two_process_run), keys_by_step(two_process_run)
    for name, overrides in layouts.items():
        run_dir = tmp_path / name
        assert_ok(
            run_train(
                *run_args(corpus), "checkpoint.every=0", "eval.val_every=0", f"run_dir={run_dir}", *overrides
            )
        )
        losses, keys = by_step(run_dir), keys_by_step(run_dir)
        for step in range(1, 9):
            assert sorted(keys[step]) == sorted(reference_keys[step]), (name, step)
            assert losses[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5), (name, step)


def test_a_nan_on_one_rank_skips_the_step_on_both(corpus, tmp_path):
    run_dir = tmp_path / "nan"
    args = [
        *run_args(corpus),
        "train.max_steps=4",
        "checkpoint.every=1",
        "checkpoint.keep_last=0",
        "checkpoint.async_commit=false",
        f"run_dir={run_dir}",
    ]
    assert_ok(run_torchrun(2, SCRIPTS / "faulty_train.py", "nan", "1", "3", *args))
    rows = by_step(run_dir)
    assert [rows[s]["skipped_steps"] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
    assert math.isnan(rows[3]["loss"]) and math.isfinite(rows[4]["loss"])
    assert [r["step"] for r in read_metrics(run_dir) if r.get("event") == "nonfinite_step_skipped"] == [3]

    def state(step: int) -> dict[str, bytes]:
        directory = run_dir / "checkpoints" / tag_for(step)
        names = [
            "ema.safetensors",
            "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        ]
        return {name: optimizer_tensors(directory / name) for name in names}

    before, skipped, after = state(2), state(3), state(4)
    for name, tensors in before.items():  # each rank's weights, moments, EMA: untouched by step 3
        assert tensors.keys() == skipped[name].keys()
        assert all(torch.equal(tensors[k], skipped[name][k]) for k in tensors), name
        assert any(not torch.equal(skipped[name][k], after[name][k]) for k in tensors), name  # step 4 trained


def optimizer_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor in a checkpoint file, by its path in the nested state (weights-only load)."""
    if path.suffix == ".safetensors":
        return load_file(path)
    with weights_only_loads():
        state = torch.load(path, map_location="cpu")
    flat: dict[str, torch.Tensor] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, torch.Tensor):
            flat[prefix] = node
        elif isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}/{key}")
        elif isinstance(node, list | tuple):
            for index, value in enumerate(node):
                walk(value, f"{prefix}/{index}")

    walk(state["optimizer_state_dict"], "")
    return flat


@pytest.mark.parametrize("recipe", ["zero1", "zero3_offload"])
def test_each_zero_recipe_trains_resumes_exactly_and_exports(corpus, tmp_path, recipe):
    """ZeRO-2 is the reference run's, plain ZeRO-3 the minute-long recipe's (test_sequence_parallel.py);
    the other recipes: 4 steps, then a resume from step 2 that ends the same (two steps after the
    resume: ZeRO-3 records its parameter-fetch trace in the first one)."""
    run_dir, resumed = tmp_path / "run", tmp_path / "resumed"
    args = [a for a in run_args(corpus) if not a.startswith("parallel.")]
    args += [f"parallel={recipe}", "train.max_steps=4", "checkpoint.every=2", "launch.nproc_per_node=2"]
    assert_ok(run_train(*args, f"run_dir={run_dir}"))
    shutil.copytree(run_dir, resumed)
    shutil.rmtree(resumed / "checkpoints" / tag_for(4))
    assert_ok(run_train(*args, f"run_dir={resumed}"))
    for step in (3, 4):
        assert by_step(resumed)[step]["loss"] == by_step(run_dir)[step]["loss"]
    final = Path("checkpoints") / tag_for(4) / "ema.safetensors"
    assert (resumed / final).read_bytes() == (run_dir / final).read_bytes()
    exports = {}
    for weights in ("ema", "raw"):
        out = tmp_path / weights
        assert_ok(run_module("sora_train.export", str(run_dir), "--out", str(out), "--weights", weights))
        exports[weights] = load_file(out / "model.safetensors")
    assert exports["ema"].keys() == exports["raw"].keys()
    # after 4 steps the EMA (decay warm-up 1/10, 2/11, 3/12, 4/13) sits between the initial and the trained weights
    assert any(not torch.equal(exports["ema"][k], exports["raw"][k]) for k in exports["raw"])


def test_a_stale_extension_build_lock_is_cleared_and_a_live_one_kept(tmp_path, monkeypatch):
    """A build killed mid-way leaves torch's lock file; later runs must not wait on it forever."""
    from torch.utils.cpp_extension import _get_build_directory

    from sora_train.parallel.dist import clear_stale_build_lock

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))

    lock = Path(_get_build_directory("some_op", verbose=False)) / "lock"
    lock.write_text("")
    assert clear_stale_build_lock("some_op") is None and lock.exists()  # a build may be running
    hour_ago = time.time() - 3600
    os.utime(lock, (hour_ago, hour_ago))
    assert clear_stale_build_lock("some_op") == lock and not lock.exists()


LEAVE_SCRIPT = """
import atexit, logging, sys
from sora_train.parallel.dist import init_distributed, leave_process, shutdown_distributed
logging.basicConfig(filename=sys.argv[1], level=logging.INFO)
atexit.register(print, " finalized")
if sys.argv[2] == "joined":
    init_distributed()
    shutdown_distributed()
logging.info("logged before leaving")
print("printed before leaving", end="")
leave_process(3)
"""


@pytest.mark.parametrize("joined", [True, False])
def test_a_process_leaves_with_its_code_and_its_output_flushed(tmp_path, joined):
    """After a process group, `leave_process` skips interpreter finalization (where gloo's surviving
    worker threads can abort the process) but keeps the exit code and every buffered line."""
    log = tmp_path / "log.txt"
    kind = "joined" if joined else "alone"
    result = run_python("-c", LEAVE_SCRIPT, str(log), kind, env={"PYTHONUNBUFFERED": ""})
    assert result.returncode == 3, result.stderr[-2000:]
    expected = "printed before leaving" + ("" if joined else " finalized\n")
    assert result.stdout.endswith(expected), result.stdout
    assert "logged before leaving" in log.read_text()


def test_data_parallel_ranks_hold_identical_weights(two_process_run):
    """Each rank keeps the checksums it compared before saving; after 8 steps with DP=2 they agree."""
    checksums = []
    for rank in (0, 1):
        with weights_only_loads():
            state = torch.load(two_process_run / "checkpoints" / tag_for(8) / f"rank_{rank:05d}.pt")
        checksums.append(state["parameter_checksums"])
    assert checksums[0] is not None and len(checksums[0]) > 10
    assert torch.equal(checksums[0], checksums[1])


def test_ranks_that_cannot_see_each_others_files_still_describe_every_file(corpus, tmp_path):
    """Each rank's listing of the staging directory misses the files the other rank wrote (as on a
    network filesystem whose attribute cache lags): every file is still in the manifest, because
    each rank describes the files it wrote, and the checkpoint verifies."""
    from sora_train.checkpoint import verify_checkpoint
    from sora_train.checkpoint.manifest import list_files, read_manifest

    run_dir = tmp_path / "lagging"
    args = [*run_args(corpus), "train.max_steps=2", "checkpoint.every=2", f"run_dir={run_dir}"]
    assert_ok(run_torchrun(2, SCRIPTS / "faulty_train.py", "lagging_listing", *args))
    checkpoint = run_dir / "checkpoints" / tag_for(2)
    files = list_files(checkpoint)
    assert sorted(read_manifest(checkpoint)["files"]) == files
    assert any("rank_1_" in name for name in files) and "rank_00001.pt" in files
    assert verify_checkpoint(checkpoint) == []


def test_weights_drifting_on_one_rank_stop_the_run(corpus, tmp_path):
    run_dir = tmp_path / "desync"
    args = [*run_args(corpus), "train.max_steps=3", "checkpoint.every=2", f"run_dir={run_dir}"]
    result = run_torchrun(2, SCRIPTS / "faulty_train.py", "desync", "1", "2", *args)
    assert result.returncode != 0
    assert (
        "at step 2 rank 1 holds different weights from rank 0 in 1 parameter(s), e.g. dit.patch_embed.weight"
        in (result.stderr)
    )
    assert not (run_dir / "checkpoints" / tag_for(2)).exists()


@pytest.mark.parametrize("work_s, limit_s", [(1.0, 60.0), (30.0, 3.0)])
def test_ranks_wait_for_rank_0_as_long_as_its_work_may_take_and_no_longer(tmp_path, work_s, limit_s):
    """Within the limit both ranks go on; past it the waiting rank fails at the limit (not at the
    process group's 30 minutes) with an error naming the work."""
    out = tmp_path / "wait"
    result = run_torchrun(2, SCRIPTS / "wait_check.py", str(work_s), str(limit_s), str(out))
    waited, outcome = Path(f"{out}.1").read_text().split(" ", 1)
    if work_s < limit_s:
        assert_ok(result)
        assert outcome.strip() == "ok" and work_s - 0.5 < float(waited) < limit_s
    else:
        assert result.returncode != 0
        assert limit_s <= float(waited) < limit_s + 10, waited
        assert outcome.startswith("failed rank 1 waited for rank 0 to finish its work (allowed 3s)"), outcome
