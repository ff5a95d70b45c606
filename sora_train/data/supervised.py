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
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

_DIED = object()  # a sentinel: what a worker's pipe gives when the worker died mid-answer; no item


@dataclass(frozen=True)
class WorkerFailure:
    """An item whose worker timed out or died; `reason` is `timeout` or `decoder_crash`."""

    reason: str
    detail: str


def _serve(fn: Callable[[Any], Any], conn: Connection, setup: Callable[[], None] | None) -> None:
    """Worker loop: set up, say ready (imports done), then receive (index, item), send (index, fn(item))."""
    if setup is not None:
        setup()
    conn.send(None)
    while True:
        message = conn.recv()
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
    """
    source = iter(items)
    first = next(source, _DIED)
    if first is _DIED:
        return  # nothing to do: start no process
    source = itertools.chain([first], source)
    context = multiprocessing.get_context("spawn")
    max_pending = max_pending or 4 * workers
    pool = [_Worker(context, fn, worker_setup) for _ in range(workers)]
    waiting: dict[int, Any] = {}  # submitted or queued items by input index
    queue: list[int] = []  # indices not yet given to a worker
    done: dict[int, Any] = {}
    next_index = next_yield = 0
    exhausted = False
    try:
        while True:
            while not exhausted and len(waiting) < max_pending:
                try:
                    waiting[next_index] = next(source)
                except StopIteration:
                    exhausted = True
                    break
                queue.append(next_index)
                next_index += 1
            for worker in pool:
                if worker.ready and worker.task is None and queue:
                    index = queue.pop(0)
                    worker.submit(index, waiting[index])
            while next_yield in done:
                yield waiting.pop(next_yield), done.pop(next_yield)
                next_yield += 1
            if exhausted and not waiting:
                return
            watched = [w for w in pool if w.task is not None or not w.ready]
            if not watched:
                continue
            busy = [w.started for w in watched if w.task is not None]
            ready = wait(
                [w.conn for w in watched] + [w.process.sentinel for w in watched],
                timeout=max(0.0, min(busy) + timeout - time.monotonic()) if busy else None,
            )
            for slot, worker in enumerate(pool):
                if worker.ready and worker.task is None:
                    continue
                if worker.conn in ready:
                    try:
                        message = worker.conn.recv()
                    except (EOFError, OSError):
                        message = _DIED  # died while answering: handled below
                    if message is None:
                        worker.ready = True
                        continue
                    if message is not _DIED:
                        index, result = message
                        done[index] = result
                        worker.task = None
                        worker.served += 1
                        if max_tasks is not None and worker.served >= max_tasks:
                            worker.stop()
                            pool[slot] = _Worker(context, fn, worker_setup)
                        continue
                if not worker.ready:
                    if worker.process.is_alive():
                        continue
                    raise RuntimeError(
                        f"a worker process failed to start (exit code {worker.process.exitcode})"
                    )
                if not worker.process.is_alive() or worker.process.sentinel in ready:
                    worker.process.join(timeout=1)
                    done[worker.task] = WorkerFailure(
                        "decoder_crash", f"worker exited with code {worker.process.exitcode}"
                    )
                elif time.monotonic() - worker.started >= timeout:
                    done[worker.task] = WorkerFailure("timeout", f"no result after {timeout:g}s")
                else:
                    continue
                worker.stop(kill=True)
                pool[slot] = _Worker(context, fn, worker_setup)
    finally:
        for worker in pool:
            worker.stop(kill=worker.task is not None)
