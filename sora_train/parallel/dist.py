"""Process-group set-up and the few collectives the trainer uses.

Without torchrun's environment, a single-process group is created on a free local port,
so the same code path (DeepSpeed needs a process group) serves 1 and N processes.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d


@dataclass(frozen=True)
class DistInfo:
    """This process' place in the job: a data-parallel × sequence-parallel grid of ranks.

    The `sequence_parallel` consecutive ranks of one sequence-parallel group share each sample;
    data-parallel rank `rank // sequence_parallel` chooses the samples.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    sequence_parallel: int = 1
    sequence_group: dist.ProcessGroup | None = None  # None without sequence parallelism

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        """Which share of the data this rank reads (the same for a sequence-parallel group)."""
        return self.rank // self.sequence_parallel

    @property
    def data_world(self) -> int:
        """How many shares the data is split into."""
        return self.world_size // self.sequence_parallel


def free_port() -> int:
    """An unused TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_wait_group: list = []  # a gloo group for `wait_for_main` when the default group is NCCL
_joined_groups: list[str] = []  # the backend of each process group this process joined


SHM_OP_NAME = "deepspeed_shm_comm"  # the op DeepSpeed JIT-builds at init_distributed on a CPU-only machine
STALE_BUILD_LOCK_S = 900.0  # a build takes minutes; a lock this old was left by a killed build


def clear_stale_build_lock(name: str = SHM_OP_NAME, max_age_s: float = STALE_BUILD_LOCK_S) -> Path | None:
    """Delete the build lock of a torch extension when a killed build left it behind.

    torch guards extension builds with a bare lock file; a process killed mid-build leaves it,
    and every later process waits on it forever. Returns the path it removed, if any.
    """
    try:
        from torch.utils.cpp_extension import _get_build_directory

        lock = Path(_get_build_directory(name, verbose=False)) / "lock"
        age = time.time() - lock.stat().st_mtime
    except (ImportError, OSError):
        return None
    if age < max_age_s:
        return None
    lock.unlink(missing_ok=True)
    print(
        f"removed a stale build lock left by an interrupted build ({age:.0f}s old): {lock}", file=sys.stderr
    )
    return lock


def init_distributed(sequence_parallel: int = 1, timeout_s: float = 1800) -> DistInfo:
    """Join (or create) the default process group (NCCL with CUDA, gloo on CPU) and this rank's
    sequence-parallel group of `sequence_parallel` consecutive ranks. A collective that some rank
    does not join within `timeout_s` seconds raises instead of waiting for ever."""
    import deepspeed

    from .sequence import sequence_groups

    if "RANK" not in os.environ:
        os.environ.update(
            {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        )  # fmt: skip
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        clear_stale_build_lock()
    timeout = timedelta(seconds=timeout_s)
    # Groups made later without a timeout (DeepSpeed's ZeRO data-parallel group, sequence_groups)
    # get torch's backend default (30 min gloo, 10 min NCCL), not the default group's: set both.
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timeout)
    _joined_groups.append(backend)
    if backend != "gloo" and dist.get_world_size() > 1:  # waits with their own timeout need gloo
        _wait_group.append(dist.new_group(backend="gloo", timeout=timeout))
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
        device=device,
        sequence_parallel=sequence_parallel,
        sequence_group=sequence_groups(sequence_parallel),
    )


def all_reduce_mean(values: list[float], device: torch.device) -> list[float]:
    """Mean of each value over all ranks."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return (tensor / dist.get_world_size()).tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` is set on at least one rank (collective)."""
    tensor = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def all_gather_objects(obj: object) -> list:
    """One picklable object from every rank, in rank order (small objects only)."""
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    """Wait for every rank."""
    dist.barrier()


class WaitForMainFailed(RuntimeError):
    """A rank stopped waiting for the main rank's work: it took longer than it may, or rank 0 died."""


def wait_for_main(work: str, timeout_s: float) -> None:
    """Every rank waits here until the main rank arrives after `work`, for at most `timeout_s`
    seconds (sized from that work, instead of the process group's timeout); raises
    WaitForMainFailed naming the work. Collective."""
    if dist.get_world_size() == 1:
        return
    group = _wait_group[0] if _wait_group else None
    token = torch.zeros(1)
    try:
        if dist.get_rank() == 0:  # each send completes once that rank is waiting
            for rank in range(1, dist.get_world_size()):
                dist.send(token, dst=rank, group=group)
        else:  # a gloo receive honours its own timeout (a barrier's send waits for the peer)
            dist.irecv(token, src=0, group=group).wait(timedelta(seconds=timeout_s))
    except RuntimeError as error:
        raise WaitForMainFailed(
            f"rank {dist.get_rank()} waited for rank 0 to {work} (allowed {timeout_s:.0f}s) and gave up: {error}"
        ) from error


def shutdown_distributed(wait_for_peers: bool = True) -> None:
    """Leave the process group, by default once every rank is done with it.

    Without the barrier, a rank that tears gloo down while a peer still talks to it can
    abort in gloo's worker threads ("terminate called without an active exception").
    A rank leaving on an error passes ``wait_for_peers=False``: its peers may never arrive.
    """
    if not dist.is_initialized():
        return
    try:
        if wait_for_peers:
            dist.barrier()
    finally:
        _wait_group.clear()
        dist.destroy_process_group()


def leave_process(code: int) -> NoReturn:
    """Exit with `code`; once this process has joined a process group, without interpreter finalization.

    `destroy_process_group` does not stop the worker threads of a gloo group something still refers
    to (DeepSpeed's module-level world group, ZeRO-3 parameters, a finished engine): they live on
    until the interpreter finalizes, and one that calls into Python then aborts the process
    ("terminate called without an active exception", SIGABRT) after a run that finished. Standard
    streams and logging are flushed first; call `shutdown_distributed` before this.
    """
    if not _joined_groups:
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
