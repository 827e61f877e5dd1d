"""One NBD connection: handshake, identity binding, and pipelined transmission.

A session drives the sans-IO `ServerConnection` over a trio stream.  The trio thread
only parses; each request then runs in an I/O worker thread, which also queues its
reply, so many requests are in flight and replies leave in completion order.  For
fencing a session counts the backend operations it has *dispatched*: once `fencing` is
set no further operation starts (the client gets EPERM, also for jobs still queued),
and `wait_drained` returns when the last one started has come back from the kernel.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from gfspy.blockd.backend import BackendError, ReadBuffer, allocate_buffer, release_payload
from gfspy.blockd.io_pool import SharedCounter
from gfspy.blockd.reply_writer import ReplyWriter, reply_writer_for
from gfspy.blockd.tls import common_name
from gfspy.nbd import server_proto as sp
from gfspy.nbd import wire
from gfspy.nbd.wire import Cmd, CmdFlag, NbdErrno, Opt, Rep

if TYPE_CHECKING:
    from gfspy.blockd.server import BlockServer, Export

log = logging.getLogger(__name__)

RECEIVE_SIZE = 1024 * 1024
MAX_IN_FLIGHT = 64  # requests of one connection admitted and not yet answered
MAX_IN_FLIGHT_BYTES = 64 * 1024 * 1024  # and the READ/WRITE data they may hold
HANDSHAKE_TIMEOUT = 60.0  # a client must finish option haggling within this
FINISH_TIMEOUT = 30.0  # after DISC or EOF, how long outstanding replies may take
_NO_LIMIT = trio.CapacityLimiter(math.inf)  # the writer thread lives as long as the session


def peer_common_name(stream: trio.SSLStream) -> str | None:
    """The CN of the verified client certificate: the node's authenticated name."""
    return common_name(stream.getpeercert())


class Session:
    """State of one client connection, shared with the fencing code in `BlockServer`."""

    def __init__(self, server: BlockServer, stream: trio.abc.Stream, session_id: str, peer: str):
        self.server = server
        self.stream = stream
        self.id = session_id
        self.peer = peer
        self.peer_ip = peer.rsplit(":", 1)[0].strip("[]")
        self.node: str | None = None
        self.incarnation: int | None = None
        self.authenticated = False  # True when the node name came from a certificate
        self.tls_cn: str | None = None
        self.export: Export | None = None
        self.started = time.time()
        self.fencing = False  # read by worker threads: set it, never clear it
        self.stopped = False  # the connection is gone: queued requests must not start
        self.requests = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self.closed = trio.Event()
        # Backend operations submitted and not yet returned (what a fence drains), and
        # requests admitted whose reply is not yet written (what bounds memory).
        self._dispatched = SharedCounter()
        self._in_flight = SharedCounter()
        self._in_flight_bytes = SharedCounter()  # READ/WRITE data held for them
        self._stats_lock = threading.Lock()
        self._cancel = trio.CancelScope()
        self._refused_fenced = 0
        self._writer: ReplyWriter | None = None  # set when transmission starts
        self._rbuf: bytearray | None = None

    # --- fencing hooks ----------------------------------------------------------

    def start_fencing(self) -> None:
        """Stop dispatching: every later request of this session gets EPERM."""
        if not self.fencing:
            self.fencing = True
            log.warning("session %s (node %s): fencing, no new I/O dispatched", self.id, self.node)

    @property
    def dispatched(self) -> int:
        """Backend operations of this session not yet returned from the kernel."""
        return self._dispatched.value

    async def wait_drained(self) -> None:
        """Return once no backend operation of this session is running."""
        await self._dispatched.wait_at_most(0)

    async def close(self) -> None:
        """Hard-disconnect and wait until the connection is fully torn down."""
        if self._writer is not None:
            self._writer.finish(abort=True)  # replies stuck behind a client not reading
        if isinstance(self.stream, trio.SocketStream):
            with contextlib.suppress(OSError):
                self.stream.socket.shutdown(socket.SHUT_RDWR)
        self._cancel.cancel()
        await self.closed.wait()

    def describe(self) -> dict[str, Any]:
        return {
            "session_id": self.id,
            "peer": self.peer,
            "node": self.node,
            "incarnation": None if self.incarnation is None else f"{self.incarnation:x}",
            "authenticated": self.authenticated,
            "export": None if self.export is None else self.export.name,
            "fencing": self.fencing,
            "closing": self.stopped,
            "in_flight": self.dispatched,
            "queued": self._in_flight.value - self.dispatched,  # waiting to run or be sent
            "requests": self.requests,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "age_s": round(time.time() - self.started, 1),
        }

    # --- main loop --------------------------------------------------------------

    async def run(self) -> None:
        try:
            with self._cancel:
                conn = sp.ServerConnection(
                    tls_mode=self.server.tls_mode, allocate_payload=allocate_buffer
                )
                await self._send(conn.data_to_send())
                with trio.move_on_after(HANDSHAKE_TIMEOUT) as handshake_scope:
                    proceed = await self._handshake(conn)
                if handshake_scope.cancelled_caught:
                    log.warning("session %s from %s: handshake timed out", self.id, self.peer)
                    proceed = False
                if proceed:
                    await self._transmission(conn)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError) as e:
            log.info("session %s from %s: connection lost: %s", self.id, self.peer, e)
        finally:
            # Requests still queued for a worker will never start now; those already
            # started are waited for before the session leaves the registry, so that a
            # FENCE or SESSION_FENCE arriving meanwhile still finds and drains them.
            self.stopped = True
            quiet = contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError)
            with trio.CancelScope(shield=True), trio.move_on_after(5), quiet:
                await self.stream.aclose()
            if self.dispatched:
                log.info(
                    "session %s: waiting for %d operations to return", self.id, self.dispatched
                )
            with trio.CancelScope(shield=True):
                await self._dispatched.wait_at_most(0)
            self.server.unregister(self)
            self.closed.set()
            log.info("session %s from %s (node %s): closed", self.id, self.peer, self.node)

    async def _send(self, data: bytes) -> None:
        """Handshake bytes (transmission replies go through the reply writer)."""
        if data:
            await self.stream.send_all(data)

    async def _send_owed_replies(self, conn: sp.ServerConnection) -> None:
        """Before hanging up, deliver option replies already produced (h11's convention),
        so a client that pipelined options still learns the real error; a peer that has
        gone already changes nothing."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await self._send(conn.data_to_send())

    async def _receive(self, conn: sp.ServerConnection) -> bool:
        """Feed the machine the next bytes; False at EOF.

        On plain TCP, recv_into one reused buffer: a fresh large bytes object per recv
        costs an mmap and its page faults every time.
        """
        if isinstance(self.stream, trio.SocketStream):
            direct = conn.payload_receive_buffer()
            if direct is not None:  # WRITE data straight into its aligned buffer
                try:
                    n = await self.stream.socket.recv_into(direct)
                except OSError as e:
                    raise trio.BrokenResourceError(str(e)) from e
                finally:
                    direct.release()
                if not n:
                    return False
                conn.payload_received(n)
                return True
            if self._rbuf is None:
                self._rbuf = bytearray(RECEIVE_SIZE)
            try:
                n = await self.stream.socket.recv_into(self._rbuf)
            except OSError as e:
                raise trio.BrokenResourceError(str(e)) from e
            if not n:
                return False
            with memoryview(self._rbuf) as view:
                conn.receive_data(view[:n])
            return True
        data = await self.stream.receive_some(RECEIVE_SIZE)
        if not data:
            return False
        conn.receive_data(data)
        return True

    async def _receive_or_eof(self, conn: sp.ServerConnection) -> bool:
        """Like _receive, but a broken connection is just the end (inside the nursery an
        exception would arrive wrapped in an ExceptionGroup)."""
        try:
            return await self._receive(conn)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            log.info("session %s from %s: connection lost: %s", self.id, self.peer, e)
            return False

    # --- handshake --------------------------------------------------------------

    async def _handshake(self, conn: sp.ServerConnection) -> bool:
        """Haggle options; True when transmission should start."""
        while True:
            event = conn.next_event()
            if event is sp.NEED_DATA:
                await self._send(conn.data_to_send())  # replies the machine gave itself
                if conn.state is sp.State.DONE:
                    return False
                if not await self._receive(conn):
                    log.info("session %s from %s: closed during handshake", self.id, self.peer)
                    return False
                continue
            if isinstance(event, sp.ProtocolError):
                log.warning(
                    "session %s from %s: protocol error: %s", self.id, self.peer, event.reason
                )
                await self._send_owed_replies(conn)
                return False
            if isinstance(event, sp.AbortRequested):
                await self._send(conn.data_to_send())
                return False
            if isinstance(event, sp.ListRequested):
                conn.send_list(self.server.export_list())
            elif isinstance(event, sp.StartTLSRequested):
                if not await self._start_tls(conn):
                    return False
            elif isinstance(event, sp.ExportRequested):
                self._answer_export(conn, event)
                if conn.state is sp.State.DONE:  # refused EXPORT_NAME: hang up
                    await self._send_owed_replies(conn)
                    return False
            await self._send(conn.data_to_send())
            if conn.state is sp.State.TRANSMISSION:
                return True

    async def _start_tls(self, conn: sp.ServerConnection) -> bool:
        await self._send(conn.data_to_send())
        context = self.server.tls_context
        assert context is not None
        tls_stream = trio.SSLStream(self.stream, context, server_side=True)
        try:
            await tls_stream.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError) as e:
            why = e.__cause__ or e
            log.warning("session %s from %s: TLS handshake failed: %r", self.id, self.peer, why)
            return False
        self.stream = tls_stream
        self.tls_cn = peer_common_name(tls_stream)
        if not self.tls_cn:
            log.warning("session %s from %s: client certificate has no CN", self.id, self.peer)
            return False
        conn.tls_established()
        log.info("session %s from %s: TLS up, certificate CN %s", self.id, self.peer, self.tls_cn)
        return True

    def _answer_export(self, conn: sp.ServerConnection, event: sp.ExportRequested) -> None:
        """Resolve export and identity, check the fence table, bind on GO."""
        try:
            ident = wire.parse_export_name(event.name)
        except ValueError as e:
            conn.refuse_export(Rep.ERR_INVALID, str(e))
            log.warning("session %s from %s: bad export name: %s", self.id, self.peer, e)
            return
        export = self.server.find_export(ident.export)
        if export is None:
            conn.refuse_export(Rep.ERR_UNKNOWN, f"no export named {ident.export!r}")
            log.info("session %s from %s: unknown export %r", self.id, self.peer, ident.export)
            return
        if self.server.shutting_down:
            conn.refuse_export(Rep.ERR_SHUTDOWN, "server is shutting down")
            return
        if self.tls_cn is not None:
            if ident.node is not None and ident.node != self.tls_cn:
                conn.refuse_export(Rep.ERR_POLICY, "declared node does not match certificate")
                log.warning(
                    "session %s from %s: declared node %s but certificate says %s",
                    self.id,
                    self.peer,
                    ident.node,
                    self.tls_cn,
                )
                return
            node, authenticated = self.tls_cn, True
        else:
            node, authenticated = ident.node or f"anon-{self.peer_ip}", False
        allowed, why = self.server.fence_table.may_connect(node, ident.incarnation)
        if not allowed:
            conn.refuse_export(Rep.ERR_POLICY, f"fenced: {why}")
            log.warning("session %s from %s: refused, %s", self.id, self.peer, why)
            return
        if event.opt != Opt.INFO:
            self.node, self.incarnation, self.authenticated = node, ident.incarnation, authenticated
            self.export = export
            self.server.register(self)
            log.info(
                "session %s from %s: node %s incarnation %s opened export %s%s",
                self.id,
                self.peer,
                node,
                "-" if ident.incarnation is None else f"{ident.incarnation:x}",
                export.name,
                "" if authenticated else " (identity NOT authenticated: no TLS)",
            )
        conn.accept_export(
            export.size,
            export.transmission_flags,
            export.block_size,
            canonical_name=export.name,
            description=f"{export.description}; session={self.id}",
        )

    # --- transmission -----------------------------------------------------------

    async def _transmission(self, conn: sp.ServerConnection) -> None:
        writer = self._writer = reply_writer_for(self.stream, self._writer_broke)
        async with trio.open_nursery() as nursery:
            writer.attach(nursery)
            if writer.threaded:
                nursery.start_soon(
                    functools.partial(trio.to_thread.run_sync, writer.run, limiter=_NO_LIMIT)
                )
            try:
                soft = await self._serve_requests(conn)
                # After DISC, answer what is still running ("finish outstanding
                # requests"), but not forever for a client that stopped reading.
                # After EOF or an error nobody is listening: drop it all.
                finished = False
                if soft:
                    with trio.move_on_after(FINISH_TIMEOUT):
                        await self._in_flight.wait_at_most(0)
                        finished = True
                    if not finished:
                        log.warning("session %s: replies unsent after %gs", self.id, FINISH_TIMEOUT)
            except BaseException:
                writer.finish(abort=True)
                raise
            writer.finish(abort=not finished)

    def _writer_broke(self, reason: str) -> None:
        """The connection can take no more replies: end the session."""
        log.info("session %s from %s: cannot send replies: %s", self.id, self.peer, reason)
        self._cancel.cancel()

    async def _serve_requests(self, conn: sp.ServerConnection) -> bool:
        """Read and hand out requests until DISC (True), EOF or a protocol error."""
        while True:
            event = conn.next_event()
            if event is sp.NEED_DATA:
                if conn.state is sp.State.DONE or not await self._receive_or_eof(conn):
                    return False
                continue
            if isinstance(event, sp.Command):
                self.requests += 1
                cost = _buffer_cost(event.request)
                await self._in_flight.wait_at_most(MAX_IN_FLIGHT - 1)
                await self._in_flight_bytes.wait_at_most(max(0, MAX_IN_FLIGHT_BYTES - cost))
                self._in_flight.add()
                self._in_flight_bytes.add(cost)
                self._submit(event.request, event.payload)
            elif isinstance(event, sp.CommandRejected):
                log.info(
                    "session %s: request %d rejected with %s: %s",
                    self.id,
                    event.request.type,
                    event.error.name,
                    event.reason,
                )
                release_payload(event.payload)
                self._in_flight.add()
                self._reply(event.request.cookie, event.error, None)
            elif isinstance(event, sp.DisconnectRequested):
                log.info("session %s: client sent DISC", self.id)
                return True
            elif isinstance(event, sp.ProtocolError):
                log.warning("session %s: protocol error: %s", self.id, event.reason)
                return False

    def _submit(self, req: wire.Request, payload: sp.Payload) -> None:
        """Trio thread: refuse now, or queue the request for an I/O worker."""
        refusal = self._refusal()
        if refusal:
            release_payload(payload)
            self._reply(req.cookie, refusal, None, _buffer_cost(req))
            return
        self.server.io_pool.submit(functools.partial(self._run_request, req, payload))

    def _refusal(self) -> int:
        """The error for a request that must not run, or 0."""
        if self.fencing:
            self._refused_fenced += 1
            if self._refused_fenced == 1:
                log.warning("session %s (node %s): refusing I/O with EPERM", self.id, self.node)
            return NbdErrno.EPERM
        if self.server.shutting_down:
            return NbdErrno.ESHUTDOWN
        return 0

    def _run_request(self, req: wire.Request, payload: sp.Payload) -> None:
        """Worker thread: run one request and queue its reply."""
        error: int = 0
        data: ReadBuffer | None = None
        # Count first, then look at the flag: a fence that sets the flag and then sees
        # no operation counted can be sure none will start.  A job still queued when the
        # fence began was never dispatched, so it does not hold up the drain; it gets
        # EPERM when it comes up, without touching the disk.
        self._dispatched.add()
        try:
            if self.fencing or self.stopped:
                error = NbdErrno.EPERM
            else:
                data = self._operation(req, payload)()
        except BackendError as e:
            error = e.nbd_error
            log.error("session %s: %s -> %s", self.id, e.strerror, e.nbd_error.name)
        except Exception:
            error = NbdErrno.EIO
            log.exception("session %s: request %d failed unexpectedly", self.id, req.type)
        finally:
            self._dispatched.sub()  # the syscall has returned (or never started)
            release_payload(payload)
        if not error and req.type in (Cmd.READ, Cmd.WRITE):
            with self._stats_lock:
                if req.type == Cmd.READ:
                    self.bytes_read += req.length
                else:
                    self.bytes_written += req.length
        self._reply(req.cookie, error, data, _buffer_cost(req))

    def _reply(self, cookie: int, error: int, data: ReadBuffer | None, cost: int = 0) -> None:
        """Any thread: hand the reply to the writer; it releases `data` once sent."""
        assert self._writer is not None
        header = wire.encode_simple_reply(error, cookie)
        done = functools.partial(self._replied, data, cost)
        self._writer.deliver(header, data.view if data is not None else b"", done)

    def _replied(self, data: ReadBuffer | None, cost: int) -> None:
        if data is not None:
            data.release()
        self._in_flight_bytes.sub(cost)
        self._in_flight.sub()

    def _operation(self, req: wire.Request, payload: sp.Payload) -> Callable[[], ReadBuffer | None]:
        assert self.export is not None
        backend = self.export.backend
        fua = bool(req.flags & CmdFlag.FUA)
        if req.type == Cmd.READ:
            return lambda: backend.read(req.offset, req.length)
        if req.type == Cmd.WRITE:
            return lambda: backend.write(req.offset, payload, fua)
        if req.type == Cmd.FLUSH:
            return backend.flush
        if req.type == Cmd.TRIM:
            return lambda: backend.trim(req.offset, req.length, fua)
        if req.type == Cmd.WRITE_ZEROES:
            may_punch = not req.flags & CmdFlag.NO_HOLE
            return lambda: backend.write_zeroes(req.offset, req.length, may_punch, fua)
        raise AssertionError(f"validated command {req.type} has no operation")


def _buffer_cost(req: wire.Request) -> int:
    """Memory a request holds until answered: its WRITE payload or READ data."""
    return req.length if req.type in (Cmd.READ, Cmd.WRITE) else 0
