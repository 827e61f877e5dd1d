"""Writing the NBD replies of one connection: whole, in any order, from any thread.

Requests finish in worker threads, which hand their reply here with `deliver`; it
never blocks.  On plain TCP one writer thread per connection writes whatever has
queued up with a single writev: copying a 1 MiB READ payload into a loopback socket
costs about a millisecond of CPU, and a syscall per 16-byte write acknowledgement costs
more than the write itself, so neither may happen on the trio thread.  TLS streams are
not thread-safe, so TLS replies are sent by trio tasks instead.

The queue needs no bound of its own: the session admits at most MAX_IN_FLIGHT
requests until their replies are written, so a client that stops reading only stalls
itself.  Every delivered reply's `done` callback runs exactly once, written or not.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import select
import threading
from collections.abc import Callable

import trio

log = logging.getLogger(__name__)

Done = Callable[[], None]
_IOV_MAX = 512
_POLL_MS = 200


class ReplyWriter:
    """TLS (or any trio stream): each reply is sent by a trio task, one at a time."""

    threaded = False

    def __init__(self, stream: trio.abc.Stream, on_broken: Callable[[str], None]) -> None:
        self._stream = stream
        self._on_broken = on_broken
        self._lock = trio.Lock()
        self._token = trio.lowlevel.current_trio_token()
        self._nursery: trio.Nursery | None = None
        self._broken = False

    def attach(self, nursery: trio.Nursery) -> None:
        """The nursery that hosts the send tasks (the session's transmission)."""
        self._nursery = nursery

    def deliver(self, header: bytes, payload: bytes | memoryview, done: Done) -> None:
        """Any thread: send this reply soon; `done` runs once it is sent or dropped."""
        try:
            self._token.run_sync_soon(self._spawn, header, payload, done)
        except trio.RunFinishedError:
            done()

    def _spawn(self, header: bytes, payload: bytes | memoryview, done: Done) -> None:
        if self._broken or self._nursery is None:
            done()
            return
        try:
            self._nursery.start_soon(self._send, header, payload, done)
        except RuntimeError:  # the session is over: nobody to send to
            done()

    async def _send(self, header: bytes, payload: bytes | memoryview, done: Done) -> None:
        try:
            if self._broken:
                return
            async with self._lock:
                await self._stream.send_all(header)
                if payload:
                    await self._stream.send_all(payload)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            if not self._broken:
                self._broken = True
                self._on_broken(str(e))
        finally:
            done()

    def run(self) -> None:
        """No thread needed for this writer."""

    def finish(self, *, abort: bool) -> None:
        """No more replies will be delivered (sends already spawned still run)."""
        if abort:
            self._broken = True


class ThreadedReplyWriter(ReplyWriter):
    """Plain TCP: a dedicated thread (`run`) writes queued replies in batches."""

    threaded = True

    def __init__(self, stream: trio.SocketStream, on_broken: Callable[[str], None]) -> None:
        super().__init__(stream, on_broken)
        self._fd = stream.socket.fileno()
        self._cond = threading.Condition()
        self._queue: collections.deque[tuple[bytes, bytes | memoryview, Done]] = collections.deque()
        self._closing = False
        self._aborted = False
        self._failure: str | None = None

    def deliver(self, header: bytes, payload: bytes | memoryview, done: Done) -> None:
        with self._cond:
            accepted = not self._closing and self._failure is None
            if accepted:
                self._queue.append((header, payload, done))
                self._cond.notify()
        if not accepted:
            done()

    def finish(self, *, abort: bool) -> None:
        """Stop the thread: after writing what is queued, or at once when aborting."""
        with self._cond:
            self._closing = True
            self._aborted = self._aborted or abort
            self._cond.notify()

    def run(self) -> None:
        """The writer thread's loop."""
        poller = select.poll()
        poller.register(self._fd, select.POLLOUT)
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if self._aborted or (self._closing and not self._queue):
                    leftover = list(self._queue)
                    self._queue.clear()
                    break
                count = min(len(self._queue), _IOV_MAX)
                batch = [self._queue.popleft() for _ in range(count)]
            if self._failure is None:
                try:
                    self._write(batch, poller)
                except OSError as e:
                    self._fail(str(e) or type(e).__name__)
            for _, _, done in batch:
                done()
        for _, _, done in leftover:
            done()

    def _write(self, batch: list, poller: select.poll) -> None:
        parts = []
        for header, payload, _ in batch:
            parts.append(memoryview(header))
            if payload:
                parts.append(memoryview(payload))
        while parts:
            if self._aborted:
                raise ConnectionAbortedError("connection is being closed")
            try:
                parts = _advance(parts, os.writev(self._fd, parts))
            except BlockingIOError:
                poller.poll(_POLL_MS)

    def _fail(self, reason: str) -> None:
        with self._cond:
            self._failure = reason
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._on_broken, reason)


def _advance(parts: list[memoryview], sent: int) -> list[memoryview]:
    """Drop `sent` bytes from the front of `parts`; return what is left (maybe empty)."""
    out = []
    for part in parts:
        if sent >= len(part):
            sent -= len(part)
            continue
        out.append(part[sent:])
        sent = 0
    return out


def reply_writer_for(stream: trio.abc.Stream, on_broken: Callable[[str], None]) -> ReplyWriter:
    if isinstance(stream, trio.SocketStream):
        return ThreadedReplyWriter(stream, on_broken)
    return ReplyWriter(stream, on_broken)
