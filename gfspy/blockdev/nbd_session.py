"""One NBD session over trio: connect, (TLS,) handshake, pipelined requests by cookie.

`NbdConnection` never reconnects, so the device layers above can reason about exactly
which session a write went out on (the in-doubt rule of reference §3.7). Its reader runs
as a trio system task: `open_device` hands back a device without a caller-supplied
nursery, so the session owns its task and `aclose` (or a failure) ends it.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import socket
import ssl
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from gfspy.blockdev.device import DeviceError
from gfspy.blockdev.nbd_client_proto import (
    NEED_DATA,
    ClientConnection,
    ConnectionClosed,
    NbdNegotiationError,
    NbdProtocolError,
    Negotiated,
    Reply,
    StartTLS,
    nbd_error_to_errno,
)
from gfspy.blockdev.quiesce import socket_errno
from gfspy.nbd import wire
from gfspy.nbd.wire import Cmd

log = logging.getLogger(__name__)

#: Commands whose effect on the disk is unknown if the reply never arrives (§3.7).
MUTATING = frozenset({Cmd.WRITE, Cmd.WRITE_ZEROES, Cmd.TRIM, Cmd.FLUSH})
#: Largest single request we send even if the server allows more (proto.md's safe bound).
MAX_REQUEST = 32 * 1024 * 1024
_RECV_SIZE = 1 << 20

#: A random 64-bit incarnation for this process: a restarted client is a new opener.
PROCESS_INCARNATION = secrets.randbits(64)


class PathError(DeviceError):
    """The session broke (disconnect, timeout, protocol error, EIO, shutdown).

    `sent` is True when the request may have reached the server, so a write is in doubt.
    """

    def __init__(self, err: int, message: str, *, sent: bool) -> None:
        super().__init__(err, message)
        self.sent = sent


class FencedError(DeviceError):
    """The server says this node is fenced (EPERM): stop, never retry elsewhere."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EPERM, message)


@dataclass(frozen=True)
class ClientIdentity:
    """Who opens the export: cluster node name plus a per-process incarnation."""

    node: str
    incarnation: int = PROCESS_INCARNATION


@dataclass(frozen=True)
class NbdTarget:
    """One parsed `nbd://host[:port]/export[?control=HOST:PORT&node=NODE]` URI."""

    uri: str
    export: str
    host: str | None = None
    port: int = wire.NBD_DEFAULT_PORT
    unix_socket: str | None = None
    control: str | None = None
    node: str | None = None
    #: nbds:// only: libnbd-style directory with ca-cert.pem, client-cert.pem, client-key.pem.
    tls: bool = False
    tls_certificates: str | None = None

    @property
    def server(self) -> str:
        """The server address for messages and for matching paths to servers."""
        return self.unix_socket or f"{self.host}:{self.port}"


def parse_nbd_uri(uri: str) -> NbdTarget:
    """Parse one NBD URI (nbd:// or nbd+unix://); raise ValueError with a clear message."""
    parts = urllib.parse.urlsplit(uri.strip())
    query = dict(urllib.parse.parse_qsl(parts.query))
    export = urllib.parse.unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    control = query.get("control")
    node = query.get("node")
    if parts.scheme in ("nbd", "nbds"):
        if not parts.hostname:
            raise ValueError(f"{uri}: no host in NBD URI")
        try:
            port = parts.port or wire.NBD_DEFAULT_PORT
        except ValueError:
            raise ValueError(f"{uri}: bad port") from None
        tls = parts.scheme == "nbds"
        certs = query.get("tls-certificates") if tls else None
        return NbdTarget(uri, export, parts.hostname, port, None, control, node, tls, certs)
    if parts.scheme == "nbd+unix":
        sock = query.get("socket")
        if not sock:
            raise ValueError(f"{uri}: nbd+unix URI needs ?socket=PATH")
        return NbdTarget(uri, export, None, 0, sock, control, node)
    raise ValueError(f"{uri}: not an nbd://, nbds:// or nbd+unix:// URI")


def default_identity(target: NbdTarget) -> ClientIdentity | None:
    """The identity to declare: from ?node= or $GFSPY_NODE, else none (plain export name)."""
    node = target.node or os.environ.get("GFSPY_NODE")
    return ClientIdentity(node) if node else None


@dataclass
class _Waiter:
    command: int
    length: int = 0
    sent: bool = False
    event: trio.Event = field(default_factory=trio.Event)
    reply: Reply | None = None
    error: BaseException | None = None


class NbdConnection:
    """One NBD session: handshake done, requests pipelined, replies matched by cookie."""

    def __init__(self, target: NbdTarget, stream: trio.abc.Stream, proto: ClientConnection):
        self.target = target
        self._stream = stream
        self._proto = proto
        self._send_lock = trio.Lock()
        self._waiters: dict[int, _Waiter] = {}
        self._failure: PathError | FencedError | None = None
        self._closing = False
        #: The TLS context of an nbds:// session; control calls reuse its certificate.
        self.tls_context: ssl.SSLContext | None = None
        self._reader_scope = trio.CancelScope()
        self.local_address: tuple[str, int] | None = None
        self.negotiated: Negotiated = proto.negotiated  # type: ignore[assignment]
        #: gfspy-blockd names the session in the description; SESSION_FENCE takes it.
        self.session_id = parse_description(self.negotiated.description).get("session")
        self.closed = trio.Event()
        #: Called once when the session fails, so an idle path is noticed at once.
        self.on_failure: Callable[[NbdConnection, PathError | FencedError], None] | None = None

    # ---- opening --------------------------------------------------------------

    @classmethod
    async def connect(
        cls, target: NbdTarget, export_name: str, *, timeout: float = 10.0
    ) -> NbdConnection:
        """Connect and negotiate; raise PathError, FencedError or DeviceError."""
        context = None
        if target.tls:
            try:
                context = client_tls_context(target.tls_certificates)
            except (OSError, ssl.SSLError) as e:
                err = getattr(e, "errno", None) or errno.EINVAL
                raise DeviceError(err, f"{target.uri}: TLS certificates: {e}") from None
        try:
            with trio.fail_after(timeout):
                stream = await _open_stream(target)
                try:
                    proto = ClientConnection(export_name, tls=target.tls)
                    stream = await _handshake(stream, proto, target, context)
                except BaseException:
                    await trio.aclose_forcefully(stream)
                    raise
        except trio.TooSlowError:
            raise PathError(
                errno.ETIMEDOUT, f"{target.server}: no NBD handshake within {timeout}s", sent=False
            ) from None
        except NbdNegotiationError as e:
            if e.errno == errno.EPERM:
                raise FencedError(f"{target.server}: {e.strerror}") from None
            raise DeviceError(e.errno or errno.EIO, f"{target.server}: {e.strerror}") from None
        except NbdProtocolError as e:
            raise PathError(errno.EPROTO, f"{target.server}: {e}", sent=False) from None
        except ssl.SSLError as e:
            raise DeviceError(errno.EACCES, f"{target.server}: TLS: {e}") from None
        except trio.BrokenResourceError as e:
            if isinstance(e.__cause__, ssl.SSLError):
                raise DeviceError(
                    errno.EACCES, f"{target.server}: TLS handshake failed: {e.__cause__}"
                ) from None
            raise PathError(errno.ECONNRESET, f"{target.server}: {e}", sent=False) from None
        except OSError as e:
            err = socket_errno(e) or errno.ECONNRESET
            raise PathError(err, f"{target.server}: {os.strerror(err)}", sent=False) from None
        conn = cls(target, stream, proto)
        conn.tls_context = context
        sock = getattr(getattr(stream, "transport_stream", stream), "socket", None)
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            conn.local_address = sock.getsockname()[:2]
        trio.lowlevel.spawn_system_task(conn._reader, name=f"nbd-reader {target.server}")
        log.debug("%s: connected, export %r, size %d", target.server, export_name, conn.size)
        return conn

    @property
    def size(self) -> int:
        return self.negotiated.size

    @property
    def broken(self) -> bool:
        return self._failure is not None

    @property
    def inflight(self) -> int:
        return len(self._waiters)

    @property
    def inflight_bytes(self) -> int:
        """Bytes of requests awaiting replies (for the service-time path selector)."""
        return sum(w.length for w in self._waiters.values())

    # ---- requests -------------------------------------------------------------

    async def submit(
        self,
        command: Cmd,
        offset: int = 0,
        length: int = 0,
        *,
        flags: int = 0,
        payload: bytes | bytearray | memoryview | None = None,
        timeout: float = 30.0,
    ) -> bytes:
        """Send one request and wait for its reply; the session fails on any timeout."""
        if self._failure is not None:
            raise _copy_failure(self._failure, sent=False)
        waiter = _Waiter(int(command), len(payload) if payload is not None else length)
        cookie = None
        sending = False
        try:
            with trio.fail_after(timeout):
                async with self._send_lock:
                    if self._failure is not None:
                        raise _copy_failure(self._failure, sent=False)
                    cookie, parts = self._proto.request_parts(
                        command, offset, length, flags=flags, payload=payload
                    )
                    self._waiters[cookie] = waiter
                    waiter.sent = sending = True
                    for part in parts:
                        await self._stream.send_all(part)
                    sending = False
                await waiter.event.wait()
        except trio.TooSlowError:
            self._fail(
                PathError(errno.ETIMEDOUT, f"{self.target.server}: request timed out", sent=True)
            )
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            if isinstance(e, DeviceError):
                raise
            self._fail(
                PathError(errno.ECONNRESET, f"{self.target.server}: send failed: {e}", sent=True)
            )
        except BaseException:
            # Cancelled mid-send: part of a frame may be on the wire, so the stream can
            # never be trusted again. Cancelled while waiting: the reply is just dropped.
            if sending:
                self._fail(
                    PathError(
                        errno.ECANCELED, f"{self.target.server}: request abandoned", sent=True
                    )
                )
            raise
        finally:
            if cookie is not None:
                self._waiters.pop(cookie, None)
        reply = waiter.reply
        if reply is None:
            failure = self._failure or PathError(errno.EIO, "no reply", sent=waiter.sent)
            raise waiter.error or _copy_failure(failure, sent=waiter.sent)
        if reply.error:
            raise self._classify(reply, offset, length)
        return reply.data

    def _classify(self, reply: Reply, offset: int, length: int) -> DeviceError:
        err = nbd_error_to_errno(reply.error)
        where = f"{self.target.server}: {Cmd(reply.command).name} {offset}+{length}"
        if err == errno.EPERM:
            failure = FencedError(f"{where}: server refused (EPERM): this node is fenced")
            self._fail(failure)
            return failure
        if err == errno.ESHUTDOWN:
            # The server errored it without running it; it asks us to go away.
            failure = PathError(err, f"{where}: server shutting down", sent=False)
            self._fail(failure)
            return failure
        if err == errno.EIO:
            # A backend failure on that server: the request finished, so not in doubt.
            return PathError(err, f"{where}: server I/O error", sent=False)
        return DeviceError(err, f"{where}: {os.strerror(err)}")

    # ---- failure and teardown -----------------------------------------------------

    def _fail(self, failure: PathError | FencedError, *, quiet: bool = False) -> None:
        """Mark the session dead and wake every waiter with the failure."""
        quiet = quiet or self._closing
        if self._failure is None:
            self._failure = failure
            if not quiet:
                log.warning("%s: session failed: %s", self.target.server, failure.strerror)
            if self.on_failure is not None and not quiet:
                self.on_failure(self, failure)
        for waiter in list(self._waiters.values()):
            if not waiter.event.is_set():
                waiter.error = _copy_failure(self._failure, sent=waiter.sent)
                waiter.event.set()
        self._reader_scope.cancel()

    async def _reader(self) -> None:
        try:
            with self._reader_scope:
                while True:
                    data = await self._stream.receive_some(_RECV_SIZE)
                    self._proto.receive_data(data)
                    while True:
                        event = self._proto.next_event()
                        if event is NEED_DATA:
                            break
                        if isinstance(event, Reply):
                            waiter = self._waiters.get(event.cookie)
                            if waiter is not None:
                                waiter.reply = event
                                waiter.event.set()
                        elif isinstance(event, ConnectionClosed):
                            self._fail(
                                PathError(
                                    errno.ECONNRESET,
                                    f"{self.target.server}: server closed the connection",
                                    sent=True,
                                )
                            )
                            return
                    if not data:  # EOF the machine did not turn into an event: stop anyway
                        self._fail(
                            PathError(
                                errno.ECONNRESET,
                                f"{self.target.server}: server closed the connection",
                                sent=True,
                            )
                        )
                        return
        except NbdProtocolError as e:
            self._fail(PathError(errno.EPROTO, f"{self.target.server}: {e}", sent=True))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            self._fail(PathError(errno.ECONNRESET, f"{self.target.server}: {e}", sent=True))
        except Exception as e:  # a bug must not kill the trio run (system task)
            log.exception("%s: reader crashed", self.target.server)
            self._fail(
                PathError(errno.EIO, f"{self.target.server}: reader crashed: {e}", sent=True)
            )
        finally:
            if self._failure is None:
                self._fail(PathError(errno.ESHUTDOWN, f"{self.target.server}: closed", sent=True))
            await trio.aclose_forcefully(self._stream)
            self.closed.set()

    async def aclose(self) -> None:
        """Soft-disconnect (DISC) if the session is healthy, then close."""
        self._closing = True  # the server hanging up after DISC is not a failure
        if self._failure is None and not self._waiters:
            with trio.move_on_after(1):
                async with self._send_lock:
                    try:
                        _, data = self._proto.request(Cmd.DISC)
                        await self._stream.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass
        self._fail(
            PathError(errno.ESHUTDOWN, f"{self.target.server}: closed by us", sent=False),
            quiet=True,
        )
        with trio.move_on_after(5):
            await self.closed.wait()


def _copy_failure(failure: PathError | FencedError, *, sent: bool) -> PathError | FencedError:
    if isinstance(failure, FencedError):
        return FencedError(failure.strerror or "fenced")
    return PathError(failure.errno or errno.EIO, failure.strerror or "path failed", sent=sent)


async def _open_stream(target: NbdTarget) -> trio.abc.Stream:
    if target.unix_socket:
        return await trio.open_unix_socket(target.unix_socket)
    assert target.host is not None
    stream = await trio.open_tcp_stream(target.host, target.port)
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    # A dead peer on an idle session is noticed in ~25 s instead of TCP's 2 h 12 min.
    for option, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):
            stream.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    return stream


async def _handshake(
    stream: trio.abc.Stream,
    proto: ClientConnection,
    target: NbdTarget,
    context: ssl.SSLContext | None,
) -> trio.abc.Stream:
    """Run the handshake; returns the stream to use (TLS-wrapped for nbds://)."""
    while True:
        event = proto.next_event()
        out = proto.data_to_send()
        if out:
            await stream.send_all(out)
        if isinstance(event, Negotiated):
            return stream
        if isinstance(event, StartTLS):
            assert context is not None
            tls_stream = trio.SSLStream(stream, context, server_hostname=target.host)
            await tls_stream.do_handshake()
            stream = tls_stream
            proto.tls_established()
        elif event is NEED_DATA:
            proto.receive_data(await stream.receive_some(65536))


def client_tls_context(certificates: str | None) -> ssl.SSLContext:
    """Verify the server against the cluster CA and present our node certificate.

    `certificates` is a directory laid out as libnbd's tls-certificates: ca-cert.pem,
    and client-cert.pem + client-key.pem when the server asks who we are.
    """
    if certificates is None:
        context = ssl.create_default_context()
    else:
        context = ssl.create_default_context(cafile=os.path.join(certificates, "ca-cert.pem"))
        cert = os.path.join(certificates, "client-cert.pem")
        key = os.path.join(certificates, "client-key.pem")
        if os.path.exists(cert):
            context.load_cert_chain(cert, key)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def export_name_for(target: NbdTarget, identity: ClientIdentity | None) -> str:
    """The name sent in GO: `NAME@NODE:INCARNATIONHEX` when an identity is declared."""
    if identity is None:
        return target.export
    return wire.format_export_name(target.export, identity.node, identity.incarnation)


def parse_description(description: str | None) -> dict[str, str]:
    """Split gfspy-blockd's `key=value; key=value` description (wwid, path, session)."""
    fields: dict[str, str] = {}
    for item in (description or "").split(";"):
        key, eq, value = item.strip().partition("=")
        if eq and key:
            fields[key] = value
    return fields
