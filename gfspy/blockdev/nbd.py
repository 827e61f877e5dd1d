"""An NBD client device: the sans-IO machine (`nbd_client_proto`) pumped by trio.

`NbdConnection` is one TCP (or Unix) session with many requests in flight; it never
reconnects, so the multipath layer can reason about exactly which session a write went
out on. `NbdDevice` wraps one connection into a `Device` and reconnects on failure.

Background readers run as trio system tasks: `open_device` hands back a device without
a caller-supplied nursery, so the device owns its tasks and `aclose` cancels them.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import socket
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from gfspy.blockdev.device import Device, DeviceError
from gfspy.blockdev.nbd_client_proto import (
    NEED_DATA,
    ClientConnection,
    ConnectionClosed,
    NbdNegotiationError,
    NbdProtocolError,
    Negotiated,
    Reply,
    nbd_error_to_errno,
)
from gfspy.nbd import wire
from gfspy.nbd.wire import Cmd, CmdFlag, TransmissionFlag

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
    if parts.scheme == "nbd":
        if not parts.hostname:
            raise ValueError(f"{uri}: no host in NBD URI")
        try:
            port = parts.port or wire.NBD_DEFAULT_PORT
        except ValueError:
            raise ValueError(f"{uri}: bad port") from None
        return NbdTarget(uri, export, parts.hostname, port, None, control, node)
    if parts.scheme == "nbd+unix":
        sock = query.get("socket")
        if not sock:
            raise ValueError(f"{uri}: nbd+unix URI needs ?socket=PATH")
        return NbdTarget(uri, export, None, 0, sock, control, node)
    if parts.scheme == "nbds":
        raise ValueError(f"{uri}: TLS (nbds://) is not supported by this client yet")
    raise ValueError(f"{uri}: not an nbd:// or nbd+unix:// URI")


def default_identity(target: NbdTarget) -> ClientIdentity | None:
    """The identity to declare: from ?node= or $GFSPY_NODE, else none (plain export name)."""
    node = target.node or os.environ.get("GFSPY_NODE")
    return ClientIdentity(node) if node else None


@dataclass
class _Waiter:
    command: int
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
        self._reader_scope = trio.CancelScope()
        self._reader_done = trio.Event()
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
        try:
            with trio.fail_after(timeout):
                stream = await _open_stream(target)
                try:
                    proto = ClientConnection(export_name)
                    await _handshake(stream, proto)
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
        except (OSError, trio.BrokenResourceError) as e:
            err = socket_errno(e) or errno.ECONNRESET
            raise PathError(err, f"{target.server}: {os.strerror(err)}", sent=False) from None
        conn = cls(target, stream, proto)
        sock = getattr(stream, "socket", None)
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
        waiter = _Waiter(int(command))
        cookie = None
        sending = False
        try:
            with trio.fail_after(timeout):
                async with self._send_lock:
                    if self._failure is not None:
                        raise _copy_failure(self._failure, sent=False)
                    cookie, data = self._proto.request(
                        command, offset, length, flags=flags, payload=payload
                    )
                    self._waiters[cookie] = waiter
                    waiter.sent = sending = True
                    await self._stream.send_all(data)
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


def socket_errno(exc: BaseException) -> int | None:
    """The errno behind a failed connect (trio wraps per-address errors in a group)."""
    seen: list[BaseException] = [exc]
    while seen:
        e = seen.pop()
        if isinstance(e, OSError) and e.errno:
            return e.errno
        if e.__cause__ is not None:
            seen.append(e.__cause__)
        seen.extend(getattr(e, "exceptions", ()))
    return None


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
    return stream


async def _handshake(stream: trio.abc.Stream, proto: ClientConnection) -> None:
    while True:
        event = proto.next_event()
        out = proto.data_to_send()
        if out:
            await stream.send_all(out)
        if isinstance(event, Negotiated):
            return
        if event is NEED_DATA:
            proto.receive_data(await stream.receive_some(65536))


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


def device_id_of(description: str | None) -> str | None:
    """The LUN identity a server reports: its `wwid=`, else a free-text description.

    A structured description without a WWID identifies nothing (it names a path on one
    server), so None: such paths are matched on size and block size alone.
    """
    if not description:
        return None
    fields = parse_description(description)
    if "wwid" in fields:
        return fields["wwid"]
    return None if fields else description.strip()


@dataclass(frozen=True)
class ExportProperties:
    """What makes two sessions the same device: size, block size and the server's WWID."""

    size: int
    block_size: int
    max_payload: int
    wwid: str | None
    flags: int

    @classmethod
    def of(cls, nego: Negotiated) -> ExportProperties:
        bs = nego.block_size
        block = bs.minimum if nego.block_size_reported else 512
        max_payload = min(bs.maximum, MAX_REQUEST) // block * block
        wwid = device_id_of(nego.description)
        return cls(nego.size, block, max(max_payload, block), wwid, nego.flags)

    def same_device(self, other: ExportProperties) -> bool:
        return (self.size, self.block_size, self.wwid) == (
            other.size,
            other.block_size,
            other.wwid,
        )

    def describe(self) -> str:
        return f"size={self.size} block={self.block_size} wwid={self.wwid or '-'}"


def check_properties(target: NbdTarget, props: ExportProperties, readonly: bool) -> None:
    """Refuse exports we cannot use safely (misaligned size, read-only when writing)."""
    if props.size % props.block_size:
        raise DeviceError(
            errno.EINVAL,
            f"{target.uri}: size {props.size} is not a multiple of block size {props.block_size}",
        )
    if not readonly and props.flags & TransmissionFlag.READ_ONLY:
        raise DeviceError(errno.EROFS, f"{target.uri}: export is read-only")


class SubmittingDevice(Device):
    """The `Device` methods in terms of NBD requests, shared by single and multipath.

    Large ranges are cut at the server's maximum payload and the pieces run
    concurrently, so one big read keeps several requests in flight.
    """

    props: ExportProperties

    async def _submit(
        self, command: Cmd, offset: int, length: int, *, flags: int = 0, payload=None
    ) -> bytes:
        raise NotImplementedError

    def can(self, flag: TransmissionFlag) -> bool:
        return bool(self.props.flags & flag)

    async def read(self, offset: int, length: int) -> bytes:
        self.check_range(offset, length)
        if length == 0:
            return b""
        chunks = split_range(offset, length, self.props.max_payload)
        if len(chunks) == 1:
            return await self._submit(Cmd.READ, offset, length)
        parts: list[bytes] = [b""] * len(chunks)

        async def one(i: int, off: int, n: int) -> None:
            parts[i] = await self._submit(Cmd.READ, off, n)

        async with trio.open_nursery() as nursery:
            for i, (off, n) in enumerate(chunks):
                nursery.start_soon(one, i, off, n)
        return b"".join(parts)

    async def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> None:
        self._check_writable()
        self.check_range(offset, len(data))
        flags = CmdFlag.FUA if fua else 0
        view = memoryview(data).cast("B")
        chunks = split_range(offset, len(view), self.props.max_payload)

        async def one(off: int, n: int) -> None:
            start = off - offset
            await self._submit(Cmd.WRITE, off, n, flags=flags, payload=view[start : start + n])

        if len(chunks) == 1:
            await one(offset, len(view))
            return
        async with trio.open_nursery() as nursery:
            for off, n in chunks:
                nursery.start_soon(one, off, n)

    async def flush(self) -> None:
        if self.readonly or not self.can(TransmissionFlag.SEND_FLUSH):
            return
        await self._submit(Cmd.FLUSH, 0, 0)

    async def discard(self, offset: int, length: int) -> None:
        self._check_writable()
        self.check_range(offset, length)
        if not self.can(TransmissionFlag.SEND_TRIM):
            return
        for off, n in split_range(offset, length, self.props.max_payload):
            await self._submit(Cmd.TRIM, off, n)

    async def write_zeroes(self, offset: int, length: int) -> None:
        self._check_writable()
        self.check_range(offset, length)
        if not self.can(TransmissionFlag.SEND_WRITE_ZEROES):
            await super().write_zeroes(offset, length)
            return
        for off, n in split_range(offset, length, self.props.max_payload):
            await self._submit(Cmd.WRITE_ZEROES, off, n)

    def _check_writable(self) -> None:
        if self.readonly:
            raise DeviceError(errno.EROFS, f"{self.name}: opened read-only")


class NbdDevice(SubmittingDevice):
    """A `Device` over one NBD server, reconnecting when the session breaks.

    Reads are retried on a fresh session. A write whose session broke before its reply
    is in doubt (§3.7): with a single server there is nowhere safe to reissue it before
    the old session is known drained, so it fails with EIO and the layers above withdraw.
    """

    def __init__(
        self,
        target: NbdTarget,
        conn: NbdConnection,
        *,
        readonly: bool,
        identity: ClientIdentity | None,
        io_timeout: float,
        connect_timeout: float,
    ) -> None:
        self.target = target
        self._conn = conn
        self._identity = identity
        self.props = ExportProperties.of(conn.negotiated)
        self.name = target.uri
        self.size = self.props.size
        self.block_size = self.props.block_size
        self.readonly = readonly
        self.io_timeout = io_timeout
        self.connect_timeout = connect_timeout
        self._reconnect_lock = trio.Lock()
        self._closed = False

    @classmethod
    async def open(
        cls,
        uri: str | NbdTarget,
        *,
        readonly: bool = False,
        identity: ClientIdentity | None = None,
        io_timeout: float = 30.0,
        connect_timeout: float = 10.0,
    ) -> NbdDevice:
        try:
            target = uri if isinstance(uri, NbdTarget) else parse_nbd_uri(uri)
        except ValueError as e:
            raise DeviceError(errno.EINVAL, str(e)) from None
        identity = identity or default_identity(target)
        conn = await NbdConnection.connect(
            target, export_name_for(target, identity), timeout=connect_timeout
        )
        try:
            check_properties(target, ExportProperties.of(conn.negotiated), readonly)
        except DeviceError:
            await conn.aclose()
            raise
        return cls(
            target,
            conn,
            readonly=readonly,
            identity=identity,
            io_timeout=io_timeout,
            connect_timeout=connect_timeout,
        )

    @property
    def wwid(self) -> str | None:
        return self.props.wwid

    async def _connection(self) -> NbdConnection:
        if self._closed:
            raise DeviceError(errno.EBADF, f"{self.name}: device is closed")
        if not self._conn.broken:
            return self._conn
        async with self._reconnect_lock:
            if self._conn.broken:
                conn = await NbdConnection.connect(
                    self.target,
                    export_name_for(self.target, self._identity),
                    timeout=self.connect_timeout,
                )
                props = ExportProperties.of(conn.negotiated)
                if not props.same_device(self.props):
                    await conn.aclose()
                    raise DeviceError(
                        errno.EIO,
                        f"{self.name}: export identity changed on reconnect "
                        f"({props.describe()} != {self.props.describe()}); refused",
                    )
                log.info("%s: reconnected", self.name)
                self._conn = conn
        return self._conn

    async def _submit(self, command: Cmd, offset: int, length: int, **kw: object) -> bytes:
        conn = await self._connection()
        try:
            return await conn.submit(command, offset, length, timeout=self.io_timeout, **kw)  # type: ignore[arg-type]
        except PathError as e:
            if command in MUTATING and e.sent:
                raise DeviceError(
                    errno.EIO, f"{self.name}: {command.name} in doubt after {e.strerror}"
                ) from None
            if command in MUTATING and e.errno == errno.EIO:
                raise DeviceError(errno.EIO, e.strerror or "I/O error") from None
            # Never sent, or a read: safe to run once more on a fresh session.
            conn = await self._connection()
            return await conn.submit(command, offset, length, timeout=self.io_timeout, **kw)  # type: ignore[arg-type]

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._conn.aclose()


def split_range(offset: int, length: int, max_payload: int) -> list[tuple[int, int]]:
    """Cut a range into requests no larger than the server's maximum payload."""
    out = []
    end = offset + length
    while offset < end:
        n = min(max_payload, end - offset)
        out.append((offset, n))
        offset += n
    return out
