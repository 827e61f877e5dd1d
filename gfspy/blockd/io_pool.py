"""Worker threads for backend I/O, and a counter that threads change and trio awaits.

A request's whole life after parsing (the syscall, its reply, freeing its buffers)
runs in one worker thread, so the trio thread pays only for parsing and a queue put;
a trio task and two thread hand-offs per request would cap small I/O at a few
thousand requests a second.  The threads are started through trio.to_thread, so they
belong to the server's nursery like any other task.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import queue
import threading
from collections.abc import Callable
from typing import Any

import trio

log = logging.getLogger(__name__)

_NO_LIMIT = trio.CapacityLimiter(math.inf)


class IOPool:
    """A fixed number of threads running submitted jobs in order of submission."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()

    def submit(self, job: Callable[[], None]) -> None:
        """Queue a job; never blocks.  Jobs must handle their own errors."""
        self._jobs.put(job)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run the threads until cancelled; then let them finish their current job."""
        async with trio.open_nursery() as nursery:
            for _ in range(self.threads):
                worker = functools.partial(trio.to_thread.run_sync, self._work, limiter=_NO_LIMIT)
                nursery.start_soon(worker)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                for _ in range(self.threads):
                    self._jobs.put(None)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except Exception:  # a job that raises is a bug; the worker must survive it
                log.exception("I/O job failed")


class SharedCounter:
    """An integer changed from any thread, which trio tasks can wait on."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0
        self._waiters: list[tuple[int, trio.Event]] = []
        self._token = trio.lowlevel.current_trio_token()

    @property
    def value(self) -> int:
        return self._value

    def add(self, n: int = 1) -> None:
        with self._lock:
            self._value += n

    def sub(self, n: int = 1) -> None:
        """Any thread; wakes the tasks waiting for the value to fall to their limit."""
        with self._lock:
            self._value -= n
            wake = any(self._value <= limit for limit, _ in self._waiters)
        if wake:
            with contextlib.suppress(trio.RunFinishedError):  # nobody left to wake
                self._token.run_sync_soon(self._wake)

    async def wait_at_most(self, limit: int) -> None:
        """Return once the value is at most `limit`."""
        while True:
            with self._lock:
                if self._value <= limit:
                    return
                event = trio.Event()
                self._waiters.append((limit, event))
            await event.wait()

    def _wake(self) -> None:
        with self._lock:
            ready = [event for limit, event in self._waiters if self._value <= limit]
            self._waiters = [(lim, ev) for lim, ev in self._waiters if self._value > lim]
        for event in ready:
            event.set()
