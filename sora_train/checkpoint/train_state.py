"""The training state a checkpoint carries beyond DeepSpeed's: EMA, guards, data position, RNG, run ids."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from safetensors.torch import load_file

from ..config import TrainConfig, config_hash
from ..data.loader import VideoLoader, merge_loader_states
from ..ema import EMA
from ..guards import TrainingGuards
from ..parallel.dist import DistInfo
from ..pretrained import EMA_WEIGHTS
from .resuming import config_changes, load_engine_state, read_rank_state
from .rng import capture_rng, reseed_rng, restore_rng


@dataclass
class Resumed:
    """Where training continues from, and what the start reports."""

    step: int = 0
    wandb_id: str | None = None
    passed_over: list[str] = field(default_factory=list)
    set_aside: list[str] = field(default_factory=list)  # newer checkpoints of an abandoned branch
    config_changes: list[tuple[str, object, object]] = field(default_factory=list)


@dataclass
class TrainState:
    """The live objects a checkpoint saves and restores, besides the step."""

    engine: object  # deepspeed.DeepSpeedEngine
    ema: EMA
    guards: TrainingGuards
    loader: VideoLoader

    def capture(
        self, cfg: TrainConfig, world_size: int, accumulation: int, wandb_id: str | None
    ) -> tuple[dict, dict]:
        """(trainer_state for trainer_state.json, this rank's state for rank_NNNNN.pt).

        `accumulation` is the run's gradient accumulation: the configured one, or the one a resume
        on a different number of ranks derived from the checkpoint.
        """
        trainer_state = {
            "world_size": world_size, "sequence_parallel": cfg.parallel.sequence_parallel,
            "grad_accum_steps": accumulation, "ema_updates": self.ema.updates,
            "guards": self.guards.state_dict(), "wandb_id": wandb_id, "config": asdict(cfg),
            "config_hash": config_hash(cfg),
        }  # fmt: skip
        rank_state = {"rng": capture_rng(), "loader": self.loader.state_dict()}
        return trainer_state, rank_state

    def restore(
        self,
        checkpoint: Path,
        trainer_state: dict,
        universal: Path | None,
        cfg: TrainConfig,
        dist_info: DistInfo,
    ) -> Resumed:
        """Load everything from `checkpoint` (collective; `universal` given when the world size changed).

        With as many data-parallel ranks as before, each rank continues the data position and RNG
        streams of the rank that read the same data (itself, or with another sequence-parallel
        degree the first rank of the old group), so training goes on exactly. With a new number of
        data-parallel ranks the data plan is dealt again from every old data-parallel rank's
        position and the RNG streams start afresh from the step.
        """
        load_engine_state(self.engine, universal or checkpoint, frozen_excluded=cfg.model.lora.enabled)
        step = trainer_state["step"]
        saved_world, saved_degree = trainer_state["world_size"], trainer_state.get("sequence_parallel", 1)
        if (saved_world, saved_degree) == (dist_info.world_size, dist_info.sequence_parallel):
            same_data = dist_info.rank
        elif saved_world // saved_degree == dist_info.data_world:
            same_data = dist_info.data_rank * saved_degree
        else:
            same_data = None
        if same_data is not None:
            rank_state = read_rank_state(checkpoint, same_data)
            self.loader.load_state_dict(rank_state["loader"])
            restore_rng(rank_state["rng"])
        else:  # one saved state per old data-parallel rank: the first rank of each old group
            saved = [read_rank_state(checkpoint, r)["loader"] for r in range(0, saved_world, saved_degree)]
            self.loader.load_state_dict(merge_loader_states(saved))
            reseed_rng(cfg.seed, step, dist_info.data_rank)
        self.ema.load_state_dict(load_file(str(checkpoint / EMA_WEIGHTS)), trainer_state["ema_updates"])
        self.guards.load_state_dict(trainer_state["guards"])
        return Resumed(
            step=step,
            wandb_id=trainer_state.get("wandb_id"),
            config_changes=config_changes(trainer_state["config"], asdict(cfg)),
        )
