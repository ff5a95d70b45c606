"""Training-health guards: skipped non-finite steps, a stop after too many, loss-spike detection.

A step whose loss or gradient norm is non-finite on any rank is not applied: DeepSpeed's
global gradient-norm check (on for every ZeRO stage and precision, see parallel/zero.py)
discards it on all ranks together, leaving weights, optimizer moments, LR schedule and EMA
as they were. The guards count such steps and stop the run after too many in a row.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps were non-finite."""


@dataclass
class GuardState:
    """Running statistics, saved in every checkpoint."""

    skipped_steps: int = 0
    consecutive_skips: int = 0
    loss_spikes: int = 0
    loss_mean: float = 0.0
    loss_var: float = 0.0
    loss_count: int = 0


@dataclass
class StepVerdict:
    """What the guards make of one step."""

    skipped: bool
    spike: bool
    stop: bool


class TrainingGuards:
    """Watches each step's outcome; `state` goes into checkpoints."""

    def __init__(
        self, max_consecutive_skips: int, spike_zscore: float, spike_warmup: int, decay: float = 0.99
    ):
        self.max_consecutive_skips = max_consecutive_skips
        self.spike_zscore = spike_zscore
        self.spike_warmup = spike_warmup
        self.decay = decay
        self.state = GuardState()

    def observe(self, applied: bool, loss: float) -> StepVerdict:
        """Record a step: `applied` is False when it was discarded as non-finite; `loss` is the
        mean over ranks."""
        state = self.state
        if not applied or not math.isfinite(loss):
            state.skipped_steps += 1
            state.consecutive_skips += 1
            stop = 0 < self.max_consecutive_skips <= state.consecutive_skips
            return StepVerdict(skipped=True, spike=False, stop=stop)
        state.consecutive_skips = 0
        spike = self._is_spike(loss)
        state.loss_spikes += spike
        self._update_statistics(loss)
        return StepVerdict(skipped=False, spike=spike, stop=False)

    def _is_spike(self, loss: float) -> bool:
        state = self.state
        if self.spike_zscore <= 0 or state.loss_count < self.spike_warmup:
            return False
        return loss > state.loss_mean + self.spike_zscore * math.sqrt(state.loss_var)

    def _update_statistics(self, loss: float) -> None:
        """Exponentially weighted mean and variance of the loss (bias-free from the first step)."""
        state = self.state
        state.loss_count += 1
        weight = max(1 - self.decay, 1 / state.loss_count)
        delta = loss - state.loss_mean
        state.loss_mean += weight * delta
        state.loss_var = (1 - weight) * (state.loss_var + weight * delta * delta)

    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = GuardState(**state)

    def diverged_message(self, step: int) -> str:
        return (
            f"step {step}: {self.state.consecutive_skips} consecutive steps had a non-finite loss or gradient "
            "norm and were skipped; lower optim.lr, check the data, or set guards.rollback=true to return "
            "to the last checkpoint"
        )
