"""Checkpoints that never lie: atomic commits, verified resume, retention, safe loading, guards, preemption."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sora_train.checkpoint import CheckpointStore, find_checkpoint, verify_checkpoint
from sora_train.checkpoint.manifest import MANIFEST, describe_files, list_files, read_manifest, write_manifest
from sora_train.checkpoint.resuming import config_changes, resumed_accumulation
from sora_train.checkpoint.store import tag_for
from sora_train.checkpoint.universal import conversion_seconds, conversion_workers
from sora_train.config import ConfigError, TrainConfig
from sora_train.guards import TrainingGuards
from sora_train.metrics import read_metrics
from sora_train.preemption import EXIT_PREEMPTED, MARKER, PreemptionWatch, requeue_slurm_job

from .conftest import FAST, assert_ok, run_module, run_script, run_train

SCRIPTS = Path(__file__).parent / "scripts"
STEP2, STEP4 = tag_for(2), tag_for(4)
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def single_args(corpus: Path) -> list[str]:
    """One process, batches of 2, a checkpoint every 2 steps."""
    return [
        *FAST, f"data.train={corpus / 'train'}", f"data.val={corpus / 'val'}", "data.num_workers=0",
        "train.global_batch_size=2", "checkpoint.every=2",
        "train.sample_prompts=[a red square moving left on a black background]",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def single_run(corpus, tmp_path_factory) -> Path:
    """4 uninterrupted steps on one process: checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    assert_ok(run_train(*single_args(corpus), "train.max_steps=4", f"run_dir={run_dir}"))
    return run_dir


def resume_config(run_dir: Path, resume: str = "auto") -> TrainConfig:
    return TrainConfig(run_dir=str(run_dir), resume=resume)


def test_a_save_commits_a_verified_directory(single_run):
    root = single_run / "checkpoints"
    assert [p.name for p in CheckpointStore(root).committed()] == [STEP4, STEP2]
    assert (root / "latest").read_text().strip() == STEP4
    assert not list(root.glob(".staging-*")) and not list(root.glob(".trash-*"))
    manifest = read_manifest(root / STEP4)
    assert sorted(manifest["files"]) == list_files(root / STEP4)
    assert {"rank_00000.pt", "trainer_state.json", "ema.safetensors", "config.json", OPTIM} <= set(
        manifest["files"]
    )
    assert manifest["step"] == 4 and manifest["world_size"] == 1
    assert verify_checkpoint(root / STEP4) == []
    state = json.loads((root / STEP4 / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["guards"]["skipped_steps"] == 0 and len(state["config_hash"]) == 16


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        ("flip", f"{OPTIM} does not match its checksum (corrupted)"),
        ("truncate", f"{OPTIM} has 100 bytes"),
        ("delete", f"{OPTIM} is missing"),
        ("unlisted", "zero_pp_rank_1_mp_rank_00_optim_states.pt is not in the manifest"),
        ("no_manifest", "no manifest.json (the save did not finish)"),
    ],
)
def test_a_damaged_newest_checkpoint_is_reported_and_passed_over(single_run, tmp_path, damage, problem):
    run_dir = tmp_path / "run"
    shutil.copytree(single_run, run_dir)
    newest = run_dir / "checkpoints" / STEP4
    target = newest / OPTIM
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    elif damage == "delete":
        target.unlink()
    elif damage == "unlisted":
        shutil.copyfile(target, newest / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    else:
        (newest / MANIFEST).unlink()
    selection = find_checkpoint(resume_config(run_dir))
    assert selection.directory == run_dir / "checkpoints" / STEP2
    assert len(selection.passed_over) == 1 and selection.passed_over[0].startswith(f"{STEP4}: {problem}")
    # named explicitly, the damaged checkpoint is an error, never a silent substitute
    with pytest.raises(ConfigError, match="no valid checkpoint"):
        find_checkpoint(resume_config(run_dir, resume=str(newest)))


def test_no_valid_checkpoint_never_silently_starts_over(single_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(single_run, run_dir)
    for name in (STEP2, STEP4):
        (run_dir / "checkpoints" / name / MANIFEST).unlink()
    with pytest.raises(ConfigError, match="resume=never to start a new run"):
        find_checkpoint(resume_config(run_dir))
    assert find_checkpoint(resume_config(run_dir, resume="never")).directory is None
    assert find_checkpoint(resume_config(tmp_path / "fresh")).directory is None  # nothing to resume: fresh
    with pytest.raises(ConfigError, match="no valid checkpoint"):
        find_checkpoint(resume_config(tmp_path / "fresh", resume=str(tmp_path)))  # asked for, absent


def test_a_crash_in_the_middle_of_a_save_resumes_from_the_previous_checkpoint(single_run, corpus, tmp_path):
    run_dir = tmp_path / "run"
    crashed = run_script(
        SCRIPTS / "faulty_train.py", "crash_in_save", "4", *single_args(corpus), "train.max_steps=4",
        f"run_dir={run_dir}",
    )  # fmt: skip
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    root = run_dir / "checkpoints"
    assert [p.name for p in CheckpointStore(root).committed()] == [STEP2]
    assert (root / "latest").read_text().strip() == STEP2
    assert (root / f".staging-{STEP4}" / OPTIM).is_file()  # the torn save: every file but no manifest

    resumed = run_train(*single_args(corpus), "train.max_steps=4", f"run_dir={run_dir}")
    assert_ok(resumed)
    assert f"checkpoint passed over: .staging-{STEP4}: a save that never finished" in resumed.stdout
    assert f"resumed from {root / STEP2} at step 2" in resumed.stdout
    assert not list(root.glob(".staging-*"))
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == [1, 2, 3, 4]
    # bitwise the uninterrupted run's weights: model (EMA) and optimizer state
    for name in ("ema.safetensors", OPTIM):
        assert (root / STEP4 / name).read_bytes() == (
            single_run / "checkpoints" / STEP4 / name
        ).read_bytes(), name


class _Exploit:
    """A pickle that creates a file when it is loaded without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_is_never_executed_by_export_or_resume(single_run, corpus, tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "pwned"
    shutil.copytree(single_run, run_dir)
    newest = run_dir / "checkpoints" / STEP4
    # beside the real files, under a name DeepSpeed's loader would glob: not in the manifest
    torch.save(
        {"optimizer_state_dict": _Exploit(marker)}, newest / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    )
    result = run_module("sora_train.export", str(newest), "--out", str(tmp_path / "out"), "--weights", "raw")
    assert result.returncode == 2 and "is not in the manifest" in result.stderr
    # in place of a real file, with the manifest rewritten to match
    (newest / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    torch.save({"optimizer_state_dict": _Exploit(marker)}, newest / OPTIM)
    manifest = read_manifest(newest)
    write_manifest(newest, {**manifest["files"], **describe_files(newest, [OPTIM])}, step=4, world_size=1)
    assert verify_checkpoint(newest) == []
    result = run_module("sora_train.export", str(newest), "--out", str(tmp_path / "out"), "--weights", "raw")
    assert result.returncode == 2 and "holds more than weights and plain data" in result.stderr
    resumed = run_train(*single_args(corpus), "train.max_steps=6", f"run_dir={run_dir}")
    assert resumed.returncode == 2 and "holds more than weights and plain data" in resumed.stderr
    assert not marker.exists()
    torch.load(newest / OPTIM, weights_only=False)  # the exploit is real: a plain load runs it
    assert marker.exists()


def test_consecutive_non_finite_steps_stop_the_run(corpus, tmp_path):
    run_dir = tmp_path / "run"
    result = run_script(
        SCRIPTS / "faulty_train.py", "nan", "0", "2,3", *single_args(corpus), "train.max_steps=6",
        "guards.max_consecutive_skips=2", f"run_dir={run_dir}",
    )  # fmt: skip
    assert result.returncode == 3, result.stderr[-2000:]
    assert "step 3: 2 consecutive steps had a non-finite loss or gradient norm" in result.stderr
    rows = {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}
    assert [rows[s]["skipped_steps"] for s in (1, 2, 3)] == [0, 1, 2]
    skipped = [r["step"] for r in read_metrics(run_dir) if r.get("event") == "nonfinite_step_skipped"]
    assert skipped == [2, 3]


def _fake_checkpoint(root: Path, step: int, complete: bool = True) -> None:
    directory = root / tag_for(step)
    directory.mkdir(parents=True)
    (directory / "weights.bin").write_bytes(bytes(64))
    write_manifest(directory, describe_files(directory, ["weights.bin"]), step=step, world_size=1)
    if not complete:
        (directory / "weights.bin").write_bytes(bytes(10))


def test_retention_keeps_the_newest_complete_checkpoints_and_every_mth(tmp_path):
    store = CheckpointStore(tmp_path)
    for step in range(1, 6):
        _fake_checkpoint(tmp_path, step)
    _fake_checkpoint(tmp_path, 6, complete=False)  # newest, but torn: it does not count
    deleted = store.prune(keep_last=2, keep_every=3)
    assert sorted(p.name for p in deleted) == [tag_for(1), tag_for(2)]
    assert [p.name for p in store.committed()] == [tag_for(s) for s in (6, 5, 4, 3)]
    assert not list(tmp_path.glob(".trash-*"))
    assert store.prune(keep_last=0, keep_every=0) == []  # keep_last=0 keeps everything


@pytest.mark.parametrize("resumed", [False, True])
def test_a_preemption_signal_during_start_up_exits_75_with_nothing_new(single_run, corpus, tmp_path, resumed):
    """SIGUSR1 while the run picks its checkpoint: start-up finishes, no step runs, nothing is saved,
    the marker is left and the exit code asks for a requeue."""
    run_dir = tmp_path / "run"
    if resumed:
        shutil.copytree(single_run, run_dir)
    before = sorted(p.name for p in (run_dir / "checkpoints").glob("*"))  # none for a fresh run
    result = run_script(
        SCRIPTS / "faulty_train.py", "signal_at", "start", "0", "0", *single_args(corpus), "train.max_steps=6",
        f"run_dir={run_dir}",
    )  # fmt: skip
    assert result.returncode == EXIT_PREEMPTED, result.stderr[-2000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*")) == before
    marker = json.loads((run_dir / MARKER).read_text())
    step = 4 if resumed else 0
    assert marker["step"] == step
    assert marker["checkpoint"] == (str(run_dir / "checkpoints" / STEP4) if resumed else None)
    events = [r for r in read_metrics(run_dir) if r.get("event") == "preempted"]
    assert [(e["step"], e["signals_by_rank"]) for e in events] == [(step, [int(signal.SIGUSR1)])]
    assert not [r for r in read_metrics(run_dir) if "loss" in r and r["step"] > step]


def test_pruning_spares_the_save_just_written_and_the_one_latest_names(tmp_path):
    store = CheckpointStore(tmp_path)
    for step in range(1, 6):
        _fake_checkpoint(tmp_path, step)
    store.point_latest(tag_for(2))
    deleted = store.prune(keep_last=1, keep_every=0, keep=(tag_for(3),))
    assert sorted(p.name for p in deleted) == [tag_for(1), tag_for(4)]
    assert [p.name for p in store.committed()] == [tag_for(s) for s in (5, 3, 2)]


@pytest.mark.parametrize("delete", [False, True])
def test_going_back_takes_the_newer_checkpoints_out_of_the_run(tmp_path, delete):
    store = CheckpointStore(tmp_path)
    for step in range(1, 6):
        _fake_checkpoint(tmp_path, step)
    store.universal_dir(5).mkdir()
    store.point_latest(tag_for(5))
    assert store.set_aside_newer(3, delete=delete) == [tag_for(4), tag_for(5)]
    assert [p.name for p in store.committed()] == [tag_for(s) for s in (3, 2, 1)]
    assert store.latest_name() == tag_for(3) and not store.universal_dir(5).exists()
    aside = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.glob("abandoned-*/*"))
    expected = [] if delete else [tag_for(4), tag_for(5), f"{tag_for(5)}.universal"]
    assert [name.split("/", 1)[1] for name in aside] == expected
    assert store.set_aside_newer(0, delete=True) == [tag_for(s) for s in (1, 2, 3)]
    assert store.latest_name() is None and store.committed() == []


def test_a_rollback_keeps_its_saves_and_auto_resume_follows_it(single_run, corpus, tmp_path):
    """resume=PATH back to step 2 while step 4 exists, keeping one checkpoint: the new step 3 is
    not pruned for the abandoned step 4, which is moved aside, and resume=auto continues from 3."""
    run_dir = tmp_path / "run"
    shutil.copytree(single_run, run_dir)
    root = run_dir / "checkpoints"
    back = run_train(
        *single_args(corpus), "train.max_steps=3", "checkpoint.every=1", "checkpoint.keep_last=1",
        f"resume={root / STEP2}", f"run_dir={run_dir}",
    )  # fmt: skip
    assert_ok(back)
    assert "checkpoints newer than step 2, from the branch this run left, taken out of it" in back.stdout
    assert [p.name for p in CheckpointStore(root).committed()] == [tag_for(3)]
    assert (root / "latest").read_text().strip() == tag_for(3)
    assert [p.name for p in root.glob("abandoned-*/*")] == [STEP4]
    events = [r for r in read_metrics(run_dir) if r.get("event") == "checkpoints_set_aside"]
    assert [e["checkpoints"] for e in events] == [[STEP4]]
    onward = run_train(*single_args(corpus), "train.max_steps=4", f"run_dir={run_dir}")
    assert_ok(onward)
    assert f"resumed from {root / tag_for(3)} at step 3" in onward.stdout


def test_guards_count_skips_stop_after_k_and_flag_spikes():
    guards = TrainingGuards(max_consecutive_skips=2, spike_zscore=4.0, spike_warmup=20)
    for i in range(30):
        assert not guards.observe(True, 1.0 + 0.01 * (i % 3)).spike
    assert guards.observe(True, 5.0).spike and guards.state.loss_spikes == 1
    first = guards.observe(False, float("nan"))
    assert first.skipped and not first.stop
    assert guards.observe(True, 1.0).skipped is False and guards.state.consecutive_skips == 0
    guards.observe(False, float("nan"))
    assert guards.observe(True, float("inf")).stop  # a non-finite loss counts even if applied
    restored = TrainingGuards(2, 4.0, 20)
    restored.load_state_dict(json.loads(json.dumps(guards.state_dict())))
    assert restored.state == guards.state and restored.state.skipped_steps == 3


def test_a_preemption_signal_only_sets_a_flag():
    watch = PreemptionWatch().install()
    try:
        assert not watch.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # would end the process without the handler
        assert watch.requested and watch.signal == signal.SIGUSR1  # the first one is kept
    finally:
        watch.uninstall()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_requeue_calls_scontrol_for_this_job(tmp_path, monkeypatch):
    log = tmp_path / "calls"
    fake = tmp_path / "scontrol"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert not requeue_slurm_job() and not log.exists()  # not under SLURM: nothing to requeue
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert requeue_slurm_job()
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert requeue_slurm_job()
    assert log.read_text().splitlines() == ["requeue 4242", "requeue 77_3"]


def test_a_new_number_of_ranks_keeps_the_micro_batch_through_accumulation():
    cfg = TrainConfig()
    assert resumed_accumulation({"world_size": 2, "grad_accum_steps": 1}, cfg, 1) == 2
    assert resumed_accumulation({"world_size": 1, "grad_accum_steps": 2}, cfg, 2) == 1
    assert resumed_accumulation({"world_size": 4, "grad_accum_steps": 2}, cfg, 8) == 1
    assert resumed_accumulation({"world_size": 4, "sequence_parallel": 2, "grad_accum_steps": 1}, cfg, 1) == 2
    with pytest.raises(ConfigError, match="divides 2"):
        resumed_accumulation({"world_size": 2, "grad_accum_steps": 1}, cfg, 4)


def test_config_changes_name_dotted_keys_and_ignore_where_the_run_lives():
    saved = {"run_dir": "a", "optim": {"lr": 1e-4, "betas": [0.9, 0.99]}, "seed": 0}
    current = {"run_dir": "b", "optim": {"lr": 3e-4, "betas": [0.9, 0.99]}, "seed": 0}
    assert config_changes(saved, current) == [("optim.lr", 1e-4, 3e-4)]


def test_a_changed_model_is_refused_with_the_setting_that_changed(single_run, corpus):
    result = run_train(
        *single_args(corpus), "model.hidden_size=64", "train.max_steps=6", f"resume={single_run}",
        f"run_dir={single_run.parent / 'other'}",
    )  # fmt: skip
    assert result.returncode == 2
    assert f"{STEP4} holds a different model" in result.stderr and "model.hidden_size" in result.stderr


def test_export_takes_the_newest_valid_checkpoint_of_a_run(single_run, tmp_path):
    out = tmp_path / "export"
    assert_ok(run_module("sora_train.export", str(single_run), "--out", str(out)))
    exported = load_file(out / "model.safetensors")
    saved = load_file(single_run / "checkpoints" / STEP4 / "ema.safetensors")
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)


def test_a_conversion_may_take_as_long_as_its_bytes_at_the_slowest_filesystem_and_uses_half_the_cpus(
    tmp_path,
):
    checkpoint = tmp_path / tag_for(4)
    (checkpoint / "global_step4").mkdir(parents=True)
    (checkpoint / "global_step4" / "optim_states.pt").write_bytes(bytes(30_000_000))
    (checkpoint / "manifest.json").write_bytes(bytes(10_000_000))
    # read and written once each at 20 MB/s, after 600 s for a fresh process
    assert conversion_seconds(checkpoint) == pytest.approx(600 + 2 * 40_000_000 / 20e6)
    assert [conversion_workers(cpus) for cpus in (1, 2, 8, 64, 256)] == [2, 2, 4, 16, 16]
