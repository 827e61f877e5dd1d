"""Writing NBD replies of one connection, whole and one at a time, from many tasks.

Copying a 1 MiB READ payload into a loopback socket costs about a millisecond of CPU;
done on the trio thread it caps every connection of the server at one core.  On plain
TCP, large replies are therefore written by worker threads straight from the aligned
read buffer, while small ones (write acknowledgements) are written inline.  A
threading lock keeps each reply contiguous on the wire whichever thread writes it.
TLS streams are not thread-safe, so they always go through trio.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading

import trio

log = logging.getLogger(__name__)

THREAD_SEND_THRESHOLD = 128 * 1024  # payloads at least this big leave the trio thread
SEND_THREADS = 4  # per connection: a client that stops reading only stalls its own
_POLL_MS = 200


class ReplyWriter:
    """Send replies over a trio stream (the portable path, used for TLS)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._lock = trio.Lock()

    async def send(self, header: bytes, payload: bytes | memoryview = b"") -> None:
        async with self._lock:
            await self._stream.send_all(header)
            if payload:
                await self._stream.send_all(payload)

    def abort(self) -> None:
        """Make sends in progress fail soon (the session is being torn down)."""


class SocketReplyWriter(ReplyWriter):
    """Replies on a plain TCP socket; big payloads are written from worker threads."""

    def __init__(self, stream: trio.SocketStream) -> None:
        super().__init__(stream)
        self._socket = stream.socket
        self._fd = stream.socket.fileno()
        self._wire_lock = threading.Lock()
        self._limiter = trio.CapacityLimiter(SEND_THREADS)
        self._aborted = False

    async def send(self, header: bytes, payload: bytes | memoryview = b"") -> None:
        if len(payload) < THREAD_SEND_THRESHOLD and self._wire_lock.acquire(blocking=False):
            try:
                await self._send_inline([memoryview(header), memoryview(payload)])
            finally:
                self._wire_lock.release()
            return
        await trio.to_thread.run_sync(self._send_blocking, header, payload, limiter=self._limiter)

    async def _send_inline(self, parts: list[memoryview]) -> None:
        """Non-blocking writes from the trio thread, waiting for room when the socket is full."""
        while True:
            with contextlib.suppress(BlockingIOError):
                parts = _advance(parts, os.writev(self._fd, [p for p in parts if p]))
            if not parts:
                return
            await trio.lowlevel.wait_writable(self._socket)

    def _send_blocking(self, header: bytes, payload: bytes | memoryview) -> None:
        """Runs in a worker thread: the whole reply, or an OSError."""
        parts = [memoryview(header), memoryview(payload)]
        poller = select.poll()
        poller.register(self._fd, select.POLLOUT)
        with self._wire_lock:
            while parts:
                if self._aborted:
                    raise ConnectionAbortedError("connection is being closed")
                try:
                    parts = _advance(parts, os.writev(self._fd, [p for p in parts if p]))
                except BlockingIOError:
                    poller.poll(_POLL_MS)

    def abort(self) -> None:
        self._aborted = True


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


def reply_writer_for(stream: trio.abc.Stream) -> ReplyWriter:
    if isinstance(stream, trio.SocketStream):
        return SocketReplyWriter(stream)
    return ReplyWriter(stream)
