"""A small bounded pipeline: read the next tensor while this one is computed and the last one written.

Merge, unmerge and diff all walk checkpoints tensor by tensor; they share this loop. Each stage runs in its
own thread (file I/O and torch kernels release the GIL), and the queues between stages hold at most one item,
so memory stays at a few tensors however large the checkpoint is.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

Job = TypeVar("Job")
Loaded = TypeVar("Loaded")
Result = TypeVar("Result")

_DONE = object()


class _Stop(Exception):
    """Raised inside a stage when another stage failed."""


class Pipeline(Generic[Job, Loaded, Result]):
    """load(job) in a reader thread, compute(job, loaded) here, sink(job, result) in a writer thread."""

    def __init__(
        self,
        load: Callable[[Job], Loaded],
        compute: Callable[[Job, Loaded], Result],
        sink: Callable[[Job, Result], None],
        depth: int = 1,
    ) -> None:
        self.load, self.compute, self.sink, self.depth = load, compute, sink, depth
        self._stop = threading.Event()
        self._error: BaseException | None = None
        # Seconds each stage spent working (not waiting): the largest one is the bottleneck.
        self.busy: dict[str, float] = {"read": 0.0, "compute": 0.0, "write": 0.0}
        # The reader may not start loading an item until there is room for it: at most `depth` loaded items
        # exist besides the one being computed, so memory holds depth + 1 inputs, not depth + 2.
        self._room = threading.Semaphore(depth)

    def _put(self, q: queue.Queue, item: object) -> None:
        while True:
            if self._stop.is_set():
                raise _Stop
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _get(self, q: queue.Queue) -> object:
        while True:
            if self._stop.is_set():
                raise _Stop
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._stop.set()

    def run(self, jobs: Iterable[Job]) -> None:
        loaded_q: queue.Queue = queue.Queue(maxsize=self.depth)
        result_q: queue.Queue = queue.Queue(maxsize=self.depth)

        def reader() -> None:
            try:
                for job in jobs:
                    while not self._room.acquire(timeout=0.1):
                        if self._stop.is_set():
                            raise _Stop
                    started = time.perf_counter()
                    loaded = self.load(job)
                    self.busy["read"] += time.perf_counter() - started
                    self._put(loaded_q, (job, loaded))
                    del loaded
                self._put(loaded_q, _DONE)
            except _Stop:
                pass
            except BaseException as exc:  # handed to the main thread
                self._fail(exc)

        def writer() -> None:
            try:
                while (item := self._get(result_q)) is not _DONE:
                    job, result = item  # type: ignore[misc]
                    started = time.perf_counter()
                    self.sink(job, result)
                    self.busy["write"] += time.perf_counter() - started
            except _Stop:
                pass
            except BaseException as exc:  # handed to the main thread
                self._fail(exc)

        threads = [threading.Thread(target=reader, daemon=True), threading.Thread(target=writer, daemon=True)]
        for thread in threads:
            thread.start()
        try:
            while (item := self._get(loaded_q)) is not _DONE:
                job, loaded = item  # type: ignore[misc]
                self._room.release()
                started = time.perf_counter()
                result = self.compute(job, loaded)
                self.busy["compute"] += time.perf_counter() - started
                del loaded, item
                self._put(result_q, (job, result))
                del result
            self._put(result_q, _DONE)
            threads[1].join()
        except _Stop:
            pass
        except BaseException as exc:
            self._fail(exc)
        finally:
            for thread in threads:
                thread.join()
        if self._error is not None:
            raise self._error
