"""Run a function over a stream of items in worker processes that may hang or crash.

`supervised_map` keeps at most `max_pending` items in flight, yields results in input order,
and turns a worker that exceeds the per-item timeout into `WorkerFailure("timeout")` and one that
dies (a segfault in a decoder, an out-of-memory kill) into `WorkerFailure("decoder_crash")`. The
worker is replaced and the stream goes on: one bad file costs its own result, never the run.
Used by data preparation (probing files) and by the training loader (decoding clips).
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

_NO_ITEM = object()  # what an empty input gives for its first item


@dataclass(frozen=True)
class WorkerFailure:
    """An item whose worker timed out or died; `reason` is `timeout` or `decoder_crash`."""

    reason: str
    detail: str


OWNER_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)  # what SLURM and torchrun send a whole process group


def _serve(fn: Callable[[Any], Any], conn: Connection, setup: Callable[[], None] | None) -> None:
    """Worker loop: set up, say ready (imports done), then receive (index, item), send (index, fn(item)).

    A preemption signal sent to the whole process group is ignored: the owner decides when its
    workers stop (it may finish a checkpoint first). A worker whose owner is gone sees its pipe
    close and leaves."""
    for number in OWNER_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    if setup is not None:
        setup()
    conn.send(None)
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the owner died
            return
        if message is None:
            return
        index, item = message
        conn.send((index, fn(item)))


class _Worker:
    """One worker process with its own pipe and the item it is busy with."""

    def __init__(self, context: Any, fn: Callable[[Any], Any], setup: Callable[[], None] | None = None):
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(fn, child, setup), daemon=True)
        self.process.start()
        child.close()
        self.ready = False  # the per-item clock starts once the worker has imported what it needs
        self.task: int | None = None
        self.started = 0.0
        self.served = 0  # items answered; a worker is recycled after `max_tasks` of them

    def submit(self, index: int, item: Any) -> None:
        self.task, self.started = index, time.monotonic()
        self.conn.send((index, item))

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.process.kill()
        else:
            with contextlib.suppress(OSError):
                self.conn.send(None)
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


class _SupervisedPool:
    """The worker processes of one `supervised_map` call and the items in flight between them.

    Items are numbered in input order. An item is `pending` from the moment it is read until its
    result is yielded; `queued` until a worker takes it; `finished` once its result (or failure)
    is known. Results leave in input order, so a slow item holds back the ones after it, and at
    most `max_pending` items are held at once.
    """

    def __init__(
        self,
        fn: Callable[[Any], Any],
        items: Iterator[Any],
        timeout: float,
        max_pending: int,
        max_tasks: int | None,
        worker_setup: Callable[[], None] | None,
    ):
        self._fn, self._worker_setup = fn, worker_setup
        self._items = items
        self._timeout, self._max_pending, self._max_tasks = timeout, max_pending, max_tasks
        self._context = multiprocessing.get_context("spawn")
        self.workers: list[_Worker] = []
        self._pending: dict[int, Any] = {}  # input index -> item, from read until yielded
        self._queued: deque[int] = deque()  # indices not yet given to a worker, in input order
        self._finished: dict[int, Any] = {}  # input index -> result or WorkerFailure, not yet yielded
        self._next_index = self._next_to_yield = 0
        self._items_exhausted = False

    def start(self, workers: int) -> None:
        """Start `workers` processes (each becomes ready once its imports and setup are done)."""
        for _ in range(workers):
            self.workers.append(self._new_worker())

    def stop(self) -> None:
        """Stop every worker: ask the idle ones to exit, kill the ones still busy with an item."""
        for worker in self.workers:
            worker.stop(kill=worker.task is not None)

    @property
    def done(self) -> bool:
        """Whether every input item has been read and its result yielded."""
        return self._items_exhausted and not self._pending

    def fill(self) -> None:
        """Read input items until `max_pending` are held or the input ends; queue them."""
        while not self._items_exhausted and len(self._pending) < self._max_pending:
            try:
                self._pending[self._next_index] = next(self._items)
            except StopIteration:
                self._items_exhausted = True
                return
            self._queued.append(self._next_index)
            self._next_index += 1

    def dispatch(self) -> None:
        """Give queued items, oldest first, to the workers that are ready and idle."""
        for worker in self.workers:
            if worker.ready and worker.task is None and self._queued:
                index = self._queued.popleft()
                worker.submit(index, self._pending[index])

    def results_in_order(self) -> Iterator[tuple[Any, Any]]:
        """Yield `(item, result)` for the finished items that no earlier unfinished item holds back."""
        while self._next_to_yield in self._finished:
            yield self._pending.pop(self._next_to_yield), self._finished.pop(self._next_to_yield)
            self._next_to_yield += 1

    def wait_and_handle(self) -> None:
        """Wait for a message, an exit or the oldest item's deadline; handle whatever happened."""
        watched = [worker for worker in self.workers if worker.task is not None or not worker.ready]
        if not watched:
            return
        busy_since = [worker.started for worker in watched if worker.task is not None]
        ready = wait(
            [worker.conn for worker in watched] + [worker.process.sentinel for worker in watched],
            timeout=max(0.0, min(busy_since) + self._timeout - time.monotonic()) if busy_since else None,
        )
        for slot, worker in enumerate(self.workers):
            if worker.ready and worker.task is None:
                continue
            if worker.conn in ready and self._receive(slot, worker):
                continue
            if not worker.ready:
                self._check_started(worker)
                continue
            failure = self._failure(worker, ready)
            if failure is not None:
                self._finished[worker.task] = failure
                self._replace(slot, kill=True)

    def _receive(self, slot: int, worker: _Worker) -> bool:
        """Take the worker's message (ready, or a result); False when it died while answering."""
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            return False  # the pipe broke: judged as a crash by the caller
        if message is None:
            worker.ready = True
            return True
        index, result = message
        self._finished[index] = result
        worker.task = None
        worker.served += 1
        if self._max_tasks is not None and worker.served >= self._max_tasks:
            self._replace(slot, kill=False)
        return True

    @staticmethod
    def _check_started(worker: _Worker) -> None:
        """Raise when a worker exited before it became ready (its setup or imports failed)."""
        if not worker.process.is_alive():
            raise RuntimeError(f"a worker process failed to start (exit code {worker.process.exitcode})")

    def _failure(self, worker: _Worker, ready: list[Any]) -> WorkerFailure | None:
        """The failure of a busy worker's item if it died or ran past the timeout; else None."""
        if not worker.process.is_alive() or worker.process.sentinel in ready:
            worker.process.join(timeout=1)
            return WorkerFailure("decoder_crash", f"worker exited with code {worker.process.exitcode}")
        if time.monotonic() - worker.started >= self._timeout:
            return WorkerFailure("timeout", f"no result after {self._timeout:g}s")
        return None

    def _replace(self, slot: int, kill: bool) -> None:
        """Stop the worker in `slot` (killing it if `kill`) and start a fresh one in its place."""
        self.workers[slot].stop(kill=kill)
        self.workers[slot] = self._new_worker()

    def _new_worker(self) -> _Worker:
        return _Worker(self._context, self._fn, self._worker_setup)


def supervised_map(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    workers: int,
    timeout: float,
    max_pending: int | None = None,
    max_tasks: int | None = None,
    worker_setup: Callable[[], None] | None = None,
) -> Iterator[tuple[Any, Any]]:
    """Yield `(item, fn(item) or WorkerFailure)` in input order, computed in `workers` processes.

    `fn` must be a picklable top-level function (or a partial of one); exceptions it raises are
    not caught here, so it should return its own error values. Memory stays bounded by
    `max_pending` items (default 4 per worker) whatever the length of `items`, and a worker is
    replaced after `max_tasks` items (None: never), so leaks in native decoders cannot grow.
    `worker_setup` (picklable, no arguments) runs in each worker before it takes items.
    Every worker is stopped when the stream ends, fails, or is closed early.
    """
    source = iter(items)
    first = next(source, _NO_ITEM)
    if first is _NO_ITEM:
        return  # nothing to do: start no process
    pool = _SupervisedPool(
        fn, itertools.chain([first], source), timeout, max_pending or 4 * workers, max_tasks, worker_setup
    )
    try:
        pool.start(workers)
        while True:
            pool.fill()
            pool.dispatch()
            yield from pool.results_in_order()
            if pool.done:
                return
            pool.wait_and_handle()
    finally:
        pool.stop()
