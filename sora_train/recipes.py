"""Where the shipped recipes (Hydra configs, bucket tables) live; importable without Hydra."""

from __future__ import annotations

from pathlib import Path


def config_dir() -> Path:
    """The recipes: inside the installed package, or the repository's top-level configs/."""
    packaged = Path(__file__).resolve().parent / "configs"
    if (packaged / "train.yaml").exists():
        return packaged
    return Path(__file__).resolve().parent.parent / "configs"
