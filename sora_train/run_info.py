"""A run dir describes itself: resolved config, git SHA, package versions, hardware, command line."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import torch
from omegaconf import OmegaConf

from .config import TrainConfig, to_dictconfig

RUN_INFO = "run_info.json"

PACKAGES = (
    "sora-train",
    "torch",
    "deepspeed",
    "webdataset",
    "decord",
    "torchcodec",
    "av",
    "hydra-core",
    "wandb",
    "einops",
    "numpy",
)


def git_sha() -> str | None:
    """The commit of the sora_train source tree, if it is a git checkout."""
    source = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that shape a run."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware(world_size: int) -> dict:
    """Host, CPU and accelerator facts."""
    info = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "world_size": world_size,
        "cuda_devices": [],
    }
    if torch.cuda.is_available():
        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def job_overrides() -> list[str]:
    """This job's command-line overrides (one job of a sweep has only its own), without run_dir."""
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else sys.argv[1:]
    return [override for override in overrides if not override.startswith("run_dir=")]


def write_run_info(cfg: TrainConfig, world_size: int) -> None:
    """Write RUN_DIR/config.yaml (resolved) and RUN_DIR/run_info.json."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(to_dictconfig(cfg)))
    info = {
        "git_sha": git_sha(),
        "command": sys.argv,
        "overrides": job_overrides(),
        "versions": package_versions(),
        "hardware": hardware(world_size),
        "config": asdict(cfg),
    }
    (run_dir / RUN_INFO).write_text(json.dumps(info, indent=2, default=str) + "\n")


def read_run_info(run_dir: str | Path) -> dict:
    """RUN_DIR/run_info.json as `write_run_info` wrote it ({} when the run dir has none)."""
    path = Path(run_dir) / RUN_INFO
    return json.loads(path.read_text()) if path.exists() else {}
