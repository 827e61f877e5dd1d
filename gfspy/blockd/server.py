"""The block server: exports, the session registry, and fencing (drain, then confirm).

A fence is acknowledged only when it is safe to replay the victim's journal: the ban is
on disk, none of the victim's requests will be dispatched any more, every operation
already dispatched for it has returned from the kernel, and its sockets are closed.
If the drain does not finish within the deadline the answer is FAILED, never CONFIRMED,
so the cluster manager escalates (power-fences this server).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import ssl
from dataclasses import dataclass
from typing import Any

import trio

from gfspy.blockd.backend import FileBackend
from gfspy.blockd.control_wire import (
    STATUS_CONFIRMED,
    STATUS_ERROR,
    STATUS_FAILED,
    STATUS_OK,
)
from gfspy.blockd.fence_table import FenceTable, FenceTableError
from gfspy.blockd.io_pool import IOPool
from gfspy.blockd.session import Session
from gfspy.nbd import wire
from gfspy.nbd.server_proto import TLSMode
from gfspy.nbd.wire import TransmissionFlag

log = logging.getLogger(__name__)

DEFAULT_DRAIN_TIMEOUT = 30.0
KEEPALIVE_IDLE = 30  # seconds of silence before probing the client
KEEPALIVE_INTERVAL = 10
KEEPALIVE_PROBES = 3
IO_THREADS = 32
MAX_PAYLOAD = wire.DEFAULT_MAX_PAYLOAD


@dataclass
class Export:
    """One exported backing store."""

    name: str
    backend: FileBackend
    wwid: str | None = None

    @property
    def size(self) -> int:
        return self.backend.size

    @property
    def block_size(self) -> wire.BlockSize:
        minimum = self.backend.block_size
        return wire.BlockSize(minimum, max(4096, minimum), MAX_PAYLOAD)

    @property
    def transmission_flags(self) -> int:
        flags = (
            TransmissionFlag.HAS_FLAGS
            | TransmissionFlag.SEND_FLUSH
            | TransmissionFlag.SEND_FUA
            | TransmissionFlag.SEND_TRIM
            | TransmissionFlag.SEND_WRITE_ZEROES
            | TransmissionFlag.CAN_MULTI_CONN  # true only because nothing is cached
        )
        if self.backend.readonly:
            flags |= TransmissionFlag.READ_ONLY
        return int(flags)

    @property
    def description(self) -> str:
        parts = [f"path={self.backend.path}"]
        if self.wwid:
            parts.insert(0, f"wwid={self.wwid}")
        if not self.backend.direct:
            parts.append("buffered")
        return "; ".join(parts)


def _tune_socket(stream: trio.SocketStream) -> None:
    """No Nagle delay on replies; keepalive so a dead client's session goes away in
    about a minute instead of the kernel's two hours (never an idle timeout: idle
    sessions of live clients are healthy)."""
    options = [
        (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE),
        (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL),
        (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES),
    ]
    for level, name, value in options:
        with contextlib.suppress(OSError):
            stream.setsockopt(level, name, value)


class BlockServer:
    """Everything one gfspy-blockd process serves and knows."""

    def __init__(
        self,
        exports: list[Export],
        fence_table: FenceTable,
        *,
        tls_context: ssl.SSLContext | None = None,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    ) -> None:
        if not exports:
            raise ValueError("at least one export is needed")
        self.exports = exports
        self.fence_table = fence_table
        self.tls_context = tls_context
        self.tls_mode = TLSMode.FORCED if tls_context is not None else TLSMode.NONE
        self.drain_timeout = drain_timeout
        self.boot_id = secrets.token_hex(4)
        self.sessions: dict[str, Session] = {}
        self.io_pool = IOPool(IO_THREADS)
        self.shutting_down = False
        self.nbd_addresses: list[str] = []
        self._next_session = 0
        self._persist_lock = trio.Lock()
        self._background: trio.Nursery | None = None

    # --- exports and sessions ---------------------------------------------------

    def find_export(self, name: str) -> Export | None:
        """By name or WWID; the empty name is the first export (for plain URIs)."""
        if name == "":
            return self.exports[0]
        for export in self.exports:
            if name in (export.name, export.wwid):
                return export
        return None

    def export_list(self) -> list[tuple[str, str]]:
        return [(e.name, e.description) for e in self.exports]

    def register(self, session: Session) -> None:
        self.sessions[session.id] = session

    def unregister(self, session: Session) -> None:
        self.sessions.pop(session.id, None)

    async def handle_nbd(self, stream: trio.SocketStream) -> None:
        """Serve one NBD connection; errors end that connection, never the server."""
        self._next_session += 1
        session_id = f"{self.boot_id}-{self._next_session}"
        try:
            host, port = stream.socket.getpeername()[:2]
            peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        except OSError:
            peer = "?"
        _tune_socket(stream)
        log.info("session %s: connection from %s", session_id, peer)
        session = Session(self, stream, session_id, peer)
        try:
            await session.run()
        except Exception:
            log.exception(
                "session %s from %s: internal error; connection dropped", session_id, peer
            )

    async def run_background(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """The I/O threads, and tasks that outlive a control request (late closing of
        undrained sessions)."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.io_pool.run)
            self._background = nursery
            task_status.started()
            await trio.sleep_forever()

    # --- fencing ------------------------------------------------------------------

    async def _persist(self) -> str | None:
        """Write the table durably; None on success, else the reason it failed."""
        async with self._persist_lock:
            snapshot = self.fence_table.serialize()
            try:
                await trio.to_thread.run_sync(self.fence_table.save, snapshot)
            except OSError as e:
                log.error("cannot persist fence table: %s", e)
                return f"cannot persist fence table: {e}"
        return None

    def _victims(self, node: str, incarnation: int | None) -> list[Session]:
        """The node's sessions a fence covers; one that never declared an incarnation
        might be the banned one, so it is always included."""
        return [
            s
            for s in self.sessions.values()
            if s.node == node and (incarnation is None or s.incarnation in (None, incarnation))
        ]

    async def _drain_and_close(self, sessions: list[Session]) -> str | None:
        """Drain then close `sessions`; None when done, else why it is not done."""
        for s in sessions:
            s.start_fencing()
        with trio.move_on_after(self.drain_timeout):
            for s in sessions:
                await s.wait_drained()
            for s in sessions:
                await s.close()
            return None
        busy = sum(s.dispatched for s in sessions)
        if self._background is not None:
            for s in sessions:
                self._background.start_soon(self._close_when_drained, s)
        return f"drain timeout after {self.drain_timeout:g} s: {busy} operations still running"

    @staticmethod
    async def _close_when_drained(session: Session) -> None:
        await session.wait_drained()
        await session.close()
        log.warning("session %s (node %s): drained late and closed", session.id, session.node)

    async def fence(self, node: str, incarnation: int | None, epoch: int) -> dict[str, Any]:
        """FENCE: ban (persisted), stop, drain, close, and only then confirm."""
        what = f"node {node} " + ("all incarnations" if incarnation is None else f"{incarnation:x}")
        log.warning("FENCE %s epoch %d: requested", what, epoch)
        self.fence_table.fence(node, incarnation, epoch)
        victims = self._victims(node, incarnation)
        for s in victims:
            s.start_fencing()
        reason = await self._persist()
        if reason is None:
            reason = await self._drain_and_close(victims)
        if reason is not None:
            log.error("FENCE %s epoch %d: FAILED: %s", what, epoch, reason)
            return {"status": STATUS_FAILED, "reason": reason}
        log.warning("FENCE %s epoch %d: CONFIRMED (%d sessions closed)", what, epoch, len(victims))
        return {"status": STATUS_CONFIRMED, "sessions_closed": [s.id for s in victims]}

    async def session_fence(self, session_id: str) -> dict[str, Any]:
        """Drain and close one session; a session that no longer exists is drained."""
        session = self.sessions.get(session_id)
        if session is None:
            log.info("SESSION_FENCE %s: no such session (already closed)", session_id)
            return {"status": STATUS_CONFIRMED, "sessions_closed": []}
        reason = await self._drain_and_close([session])
        if reason is not None:
            log.error("SESSION_FENCE %s: FAILED: %s", session_id, reason)
            return {"status": STATUS_FAILED, "reason": reason}
        log.warning("SESSION_FENCE %s (node %s): CONFIRMED", session_id, session.node)
        return {"status": STATUS_CONFIRMED, "sessions_closed": [session_id]}

    async def admit(self, node: str, incarnation: int, epoch: int) -> dict[str, Any]:
        try:
            self.fence_table.admit(node, incarnation, epoch)
        except FenceTableError as e:
            return {"status": STATUS_ERROR, "reason": str(e)}
        reason = await self._persist()
        if reason is not None:
            return {"status": STATUS_FAILED, "reason": reason}
        log.warning("ADMIT node %s incarnation %x epoch %d", node, incarnation, epoch)
        return {"status": STATUS_OK}

    async def unfence(self, node: str, epoch: int | None) -> dict[str, Any]:
        try:
            self.fence_table.unfence(node, epoch)
        except FenceTableError as e:
            return {"status": STATUS_ERROR, "reason": str(e)}
        reason = await self._persist()
        if reason is not None:
            return {"status": STATUS_FAILED, "reason": reason}
        log.warning("UNFENCE node %s epoch %s", node, "(override)" if epoch is None else epoch)
        return {"status": STATUS_OK}

    def status(self) -> dict[str, Any]:
        return {
            "status": STATUS_OK,
            "server": {
                "boot_id": self.boot_id,
                "pid": os.getpid(),
                "nbd": self.nbd_addresses,
                "tls": self.tls_context is not None,
                "drain_timeout_s": self.drain_timeout,
            },
            "fence_table": self.fence_table.to_json(),
            "sessions": [s.describe() for s in self.sessions.values()],
            "exports": [
                {
                    "name": e.name,
                    "wwid": e.wwid,
                    "path": e.backend.path,
                    "size": e.size,
                    "block_size": e.block_size.minimum,
                    "direct": e.backend.direct,
                    "readonly": e.backend.readonly,
                }
                for e in self.exports
            ],
        }
