"""Sweeps: a local multirun with a job per run dir, its report, and the SLURM and Optuna configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from PIL import Image

from sora_train.config import register_schema
from sora_train.metrics import final_validation_loss, read_metrics
from sora_train.recipes import config_dir

from .conftest import FAST, assert_ok, run_module


def sweep_args(corpus: Path) -> list[str]:
    return [
        *FAST, f"data.train={corpus / 'train'}", f"data.val={corpus / 'val'}", "data.num_workers=0",
        "train.global_batch_size=4", "train.max_steps=3", "checkpoint.every=0", "eval.val_batches=2",
        "train.sample_prompts=[a red square moving left on a black background]",
    ]  # fmt: skip


def test_a_local_sweep_runs_one_job_per_run_dir_and_reports_them(corpus, tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_module(
        "sora_train.cli",
        "-m",
        *sweep_args(corpus),
        "optim.lr=1e-4,3e-3",
        env={"SORA_SWEEP_DIR": str(sweep_dir)},
    )
    assert_ok(result)
    runs = [sweep_dir / "0", sweep_dir / "1"]
    for run, lr in zip(runs, ("0.0001", "0.003"), strict=True):
        assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3]  # its own run dir, in order
        assert f"lr: {lr}" in (run / "config.yaml").read_text().replace("1.0e-04", "0.0001")
        assert final_validation_loss(run) is not None

    report = run_module("sora_train.sweep", str(sweep_dir))
    assert_ok(report)
    table = (sweep_dir / "sweep.md").read_text().splitlines()
    assert table[0] == "| run | optim.lr | steps | final val loss | final train loss | tokens/s |"
    rows = {line.split(" | ")[1]: line for line in table[2:]}
    assert set(rows) == {"0.0001", "0.003"} and len(table) == 4
    best = min(runs, key=final_validation_loss)
    assert table[2].startswith(f"| {best.name} |")  # best first
    with Image.open(sweep_dir / "sweep.png") as image:
        assert image.format == "PNG" and image.size[0] > 400


def test_an_optuna_search_minimises_the_final_validation_loss(corpus, tmp_path):
    sweep_dir = tmp_path / "search"
    result = run_module(
        "sora_train.cli", "-m", "hydra/sweeper=search", "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.seed=0", *sweep_args(corpus), env={"SORA_SWEEP_DIR": str(sweep_dir)},
    )  # fmt: skip
    assert_ok(result)
    losses = {final_validation_loss(sweep_dir / str(trial)) for trial in range(2)}
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_value"] == min(losses)  # the search saw each trial's validation loss
    # optim.lr is searched; optim.warmup_steps, searched by the config too, is fixed by FAST's override
    assert set(results["best_params"]) == {"optim.lr"}


@pytest.mark.parametrize(
    ("override", "node", "target"),
    [
        ("hydra/launcher=slurm", "launcher", "SlurmLauncher"),
        ("hydra/sweeper=search", "sweeper", "OptunaSweeper"),
    ],
)
def test_the_slurm_launcher_and_optuna_sweeper_configs_compose(override, node, target):
    register_schema()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[override, "run_dir=unused"], return_hydra_config=True)
    section = cfg.hydra[node]
    assert section._target_.endswith(target)
    if node == "launcher":
        assert section.signal_delay_s == 300 and section.max_num_timeout == 10
