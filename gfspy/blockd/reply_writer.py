"""Writing the NBD replies of one connection: whole, in any order, from many tasks.

Copying a 1 MiB READ payload into a loopback socket costs about a millisecond of CPU,
and a syscall per 16-byte write acknowledgement costs more than the write itself; done
on the trio thread, either caps the whole server.  On plain TCP each connection
therefore gets one writer thread: tasks queue complete replies (never blocking the
trio thread), and the thread writes whatever has queued up with one writev.  The queue
is bounded in bytes, so a client that stops reading stalls only its own requests.
TLS streams are not thread-safe, so those replies go through trio.
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

Done = Callable[[], None] | None  # called once the reply's payload buffer is free again
_HIGH_WATER = 64 * 1024 * 1024  # queued reply bytes at which senders wait
_LOW_WATER = 16 * 1024 * 1024
_IOV_MAX = 512
_POLL_MS = 200


class WriterBroken(ConnectionError):
    """The connection can take no more replies."""


class ReplyWriter:
    """Send replies over a trio stream (the portable path, used for TLS)."""

    threaded = False

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._lock = trio.Lock()

    async def send(self, header: bytes, payload: bytes | memoryview = b"", done: Done = None):
        try:
            async with self._lock:
                await self._stream.send_all(header)
                if payload:
                    await self._stream.send_all(payload)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            raise WriterBroken(str(e)) from e
        finally:
            if done is not None:
                done()

    def run(self) -> None:
        """Nothing to do in a thread for this writer."""

    def finish(self, *, abort: bool) -> None:
        """No more replies will be queued."""


class ThreadedReplyWriter(ReplyWriter):
    """Replies on a plain TCP socket, written by a dedicated thread (`run`)."""

    threaded = True

    def __init__(self, stream: trio.SocketStream, on_broken: Callable[[str], None]) -> None:
        super().__init__(stream)
        self._fd = stream.socket.fileno()
        self._token = trio.lowlevel.current_trio_token()
        self._on_broken = on_broken
        self._cond = threading.Condition()
        self._queue: collections.deque[tuple[bytes, bytes | memoryview, Done]] = collections.deque()
        self._queued_bytes = 0
        self._closing = False
        self._aborted = False
        self._broken: str | None = None
        self._room: trio.Event | None = None  # set when a waiting sender may go on
        self._want_room = False  # a sender waits for the queue to shrink

    async def send(self, header: bytes, payload: bytes | memoryview = b"", done: Done = None):
        """Queue one reply; waits only while too many bytes are queued already."""
        while True:
            with self._cond:
                broken = self._broken or ("connection closed" if self._closing else None)
                if broken is None and self._queued_bytes <= _HIGH_WATER:
                    self._queue.append((header, payload, done))
                    self._queued_bytes += len(header) + len(payload)
                    self._cond.notify()
                    return
                self._want_room = broken is None
            if broken is not None:
                if done is not None:
                    done()
                raise WriterBroken(broken)
            # Created before yielding, so the writer's wake-up (run on this thread) sees it.
            if self._room is None:
                self._room = trio.Event()
            await self._room.wait()

    def finish(self, *, abort: bool) -> None:
        """Stop the thread: after writing what is queued, or at once when aborting."""
        with self._cond:
            self._closing = True
            self._aborted = self._aborted or abort
            self._cond.notify()
        if abort:
            self._wake_senders()

    # --- the writer thread ------------------------------------------------------

    def run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLOUT)
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if self._aborted or (self._closing and not self._queue):
                    batch = list(self._queue)
                    self._queue.clear()
                    self._release(batch)
                    return
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), _IOV_MAX))]
            if self._broken is None:
                try:
                    self._write(batch, poller)
                except OSError as e:
                    self._fail(str(e) or type(e).__name__)
            self._release(batch)

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

    def _release(self, batch: list) -> None:
        with self._cond:
            for header, payload, _ in batch:
                self._queued_bytes -= len(header) + len(payload)
            wake = self._want_room and self._queued_bytes <= _LOW_WATER
            if wake:
                self._want_room = False
        for _, _, done in batch:
            if done is not None:
                done()
        if wake:
            self._call_soon(self._wake_senders)

    def _fail(self, reason: str) -> None:
        with self._cond:
            if self._broken is not None:
                return
            self._broken = reason
        self._call_soon(self._on_broken, reason)
        self._call_soon(self._wake_senders)

    def _wake_senders(self) -> None:
        if self._room is not None:
            self._room.set()
            self._room = None

    def _call_soon(self, fn: Callable, *args: object) -> None:
        with contextlib.suppress(trio.RunFinishedError):  # the server is gone anyway
            self._token.run_sync_soon(fn, *args)


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
    return ReplyWriter(stream)
