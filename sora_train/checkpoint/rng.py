"""The process-wide random number generators, captured and restored per rank.

A training step's own draws come from (seed, sample key, step) (`diffusion/draws.py`) and need no
state; these are the global generators anything else may draw from."""

from __future__ import annotations

import random

import numpy as np
import torch


def capture_rng() -> dict:
    """Python, NumPy, torch CPU (and CUDA) RNG states, as tensors and plain types."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Undo `capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    keys = numpy_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(
        ("MT19937", keys, numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def reseed_rng(seed: int, step: int, rank: int) -> None:
    """Fresh, reproducible streams for `rank` from `step` on (after a change in the number of
    ranks, where the saved per-rank states no longer map onto ranks)."""
    stream = seed + 1_000_003 * step + 1000 * (rank + 1)
    random.seed(stream)
    np.random.seed(stream % 2**32)
    torch.manual_seed(stream)
