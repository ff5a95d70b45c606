"""A run's config composed outside `sora-train`'s Hydra main (sora-plan, tests, benchmarks), and
Hydra's composition errors as one line."""

from __future__ import annotations

import re

from hydra import compose, initialize_config_dir

from .config import ConfigError, TrainConfig, register_schema, to_train_config
from .recipes import config_dir


def compose_config(overrides: list[str]) -> TrainConfig:
    """The TrainConfig `sora-train` would run with these Hydra overrides of configs/train.yaml,
    not yet validated (raises ConfigError with a one-line message)."""
    register_schema()
    try:
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            return to_train_config(compose("train", overrides=overrides))
    except Exception as error:  # Hydra and OmegaConf raise several types; all mean a bad override
        raise ConfigError(describe_override_error(error)) from error


def describe_override_error(error: BaseException) -> str:
    """Hydra's multi-line composition errors as one line that names the problem."""
    text = str(error)
    missing = re.search(r"Could not find '([^/']+)/([^']+)'", text)
    if missing:
        options = re.findall(r"^\t(\S+)$", text.split("Config search path")[0], flags=re.MULTILINE)
        return f"unknown {missing[1]} {missing[2]!r}; choose one of: {', '.join(options)}"
    unknown = re.search(r"Could not override '([^']+)'", text)
    if unknown:
        return f"unknown config key {unknown[1]!r}"
    cause = error.__cause__
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
    if cause is not None and str(cause).strip():
        return f"{first}: {str(cause).strip().splitlines()[0]}"
    return first
