"""When and how the loop checkpoints: every `checkpoint.every` steps (committed in the background
when `checkpoint.async_commit`), at the end, and on a preemption signal, which the ranks agree on
at a step boundary before they save, leave the marker, ask SLURM to requeue and stop."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import CheckpointStore, PendingSave, checkpoint_root, save_checkpoint, step_of
from ..checkpoint.train_state import TrainState
from ..config import TrainConfig
from ..metrics import MetricsLogger
from ..parallel.dist import DistInfo, all_gather_objects, any_rank, barrier
from ..parallel.replicas import check_replicas
from ..preemption import PreemptionWatch, mark_preempted, requeue_slurm_job
from ..pretrained import inference_config


class Checkpointer:
    """Owns the checkpoint store, the save still committing in the background (at most one), the
    save cadence and the preemption watch (installed before start-up, or on construction). Every
    method is collective."""

    def __init__(
        self, cfg: TrainConfig, dist_info: DistInfo, state: TrainState, accumulation: int,
        logger: MetricsLogger | None, step: int, watch: PreemptionWatch | None = None,
    ):  # fmt: skip
        self.cfg, self.dist_info, self.state, self.accumulation = cfg, dist_info, state, accumulation
        self.logger = logger
        self.store = CheckpointStore(checkpoint_root(cfg.run_dir))
        self.pending: list[PendingSave] = []
        self.last_saved = step
        self.watch = watch if watch is not None else PreemptionWatch().install()

    def maybe_save(self, step: int) -> None:
        """Log a background save that has finished; save when `step` is on the cadence."""
        if self.pending and self.pending[0].done:
            self.finish_saving()
        every = self.cfg.checkpoint.every
        if every and step % every == 0:
            self.save(step, background=self.cfg.checkpoint.async_commit)

    def preempted(self, step: int) -> bool:
        """Whether any rank was signalled; if so checkpoint (unless `step` just was), leave the
        marker, ask SLURM to requeue, and close the logger: the run then stops."""
        if not any_rank(self.watch.requested, self.dist_info.device):
            return False
        self.finish_saving()
        saved = self.store.final_dir(step) if self.last_saved == step else self.save(step)
        # which ranks were told, for the record: asked once the save is done, so that a signal sent
        # to every node at once but relayed a little later to some is not missed
        signals = all_gather_objects(self.watch.signal)
        saved = saved if saved.is_dir() else None  # signalled before a fresh run's first step
        if self.logger:
            self.logger.log_event(
                "preempted", step, {"signals_by_rank": signals, "checkpoint": saved and str(saved)}
            )
            mark_preempted(self.cfg.run_dir, step, saved)
            if self.cfg.checkpoint.requeue:
                self.logger.log_event("requeue", step, {"requested": requeue_slurm_job()})
            self.logger.close()
        barrier()
        return True

    def finish(self, step: int) -> None:
        """At the end of training: let the last background save commit, and save the final step unless
        it just was (and `checkpoint.save_final`). A signal from now on is recorded, not acted on."""
        self.finish_saving()
        if self.cfg.checkpoint.save_final and self.last_saved != step:
            self.save(step)

    def save(self, step: int, background: bool = False) -> Path:
        """Checkpoint `step` (after the save in flight); returns where it is once committed."""
        self.finish_saving()
        cfg = self.cfg
        checksums = check_replicas(self.state.engine.module, cfg.parallel.zero_stage, step)
        trainer_state, rank_state = self.state.capture(
            cfg, self.dist_info.world_size, self.accumulation, self.logger.wandb_id if self.logger else None
        )
        rank_state["parameter_checksums"] = checksums  # identical on every rank (ZeRO-1/2), for audits
        self.pending.append(save_checkpoint(
            self.state.engine, cfg.run_dir, self.dist_info, step, rank_state, trainer_state,
            self.state.ema.state_dict(only_rank=0), inference_config(cfg), cfg.checkpoint.keep_last,
            cfg.checkpoint.keep_every, background, frozen_excluded=cfg.model.lora.enabled,
        ))  # fmt: skip
        self.last_saved = step
        if not background:
            self.finish_saving()
        return self.store.final_dir(step)

    def finish_saving(self) -> None:
        """Wait for the save in flight (this rank's part; on rank 0 the commit) and log it."""
        while self.pending:
            directory = self.pending.pop().wait()
            if self.logger:
                self.logger.log_event("checkpoint", step_of(directory), {"path": str(directory)})
