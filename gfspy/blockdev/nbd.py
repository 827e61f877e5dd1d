"""An NBD client `Device`: one server (`NbdDevice`), reconnecting when the session breaks.

The session itself (connect, handshake, pipelining) is `nbd_session.NbdConnection`; this
module adds what makes a session a device: the export's identity and limits, request
splitting, retries, and the in-doubt rule for writes (reference §3.7).
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

import trio

from gfspy.blockdev.device import Device, DeviceError
from gfspy.blockdev.nbd_client_proto import Negotiated
from gfspy.blockdev.nbd_session import (
    MAX_REQUEST,
    MUTATING,
    PROCESS_INCARNATION,
    ClientIdentity,
    FencedError,
    NbdConnection,
    NbdTarget,
    PathError,
    default_identity,
    export_name_for,
    parse_description,
    parse_nbd_uri,
)
from gfspy.blockdev.quiesce import FenceServerHook, obtain_quiesce_guarantee
from gfspy.nbd.wire import Cmd, CmdFlag, TransmissionFlag

__all__ = [
    "MUTATING",
    "PROCESS_INCARNATION",
    "ClientIdentity",
    "ExportProperties",
    "FencedError",
    "NbdConnection",
    "NbdDevice",
    "NbdTarget",
    "PathError",
    "SubmittingDevice",
    "check_properties",
    "default_identity",
    "export_name_for",
    "parse_description",
    "parse_nbd_uri",
]

log = logging.getLogger(__name__)


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
        self,
        command: Cmd,
        offset: int,
        length: int,
        *,
        flags: int = 0,
        payload: bytes | bytearray | memoryview | None = None,
    ) -> bytes:
        """Run one request (at most max_payload long) and return what it read."""
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
        await self._submit_range(Cmd.TRIM, offset, length)

    async def write_zeroes(self, offset: int, length: int) -> None:
        self._check_writable()
        self.check_range(offset, length)
        if not self.can(TransmissionFlag.SEND_WRITE_ZEROES):
            await super().write_zeroes(offset, length)
            return
        await self._submit_range(Cmd.WRITE_ZEROES, offset, length)

    async def _submit_range(self, command: Cmd, offset: int, length: int) -> None:
        """A payload-less command over a range, its pieces in flight together."""
        chunks = split_range(offset, length, self.props.max_payload)
        if len(chunks) == 1:
            await self._submit(command, offset, length)
            return
        async with trio.open_nursery() as nursery:
            for off, n in chunks:
                nursery.start_soon(self._submit, command, off, n)

    def _check_writable(self) -> None:
        if self.readonly:
            raise DeviceError(errno.EROFS, f"{self.name}: opened read-only")


class NbdDevice(SubmittingDevice):
    """A `Device` over one NBD server, reconnecting when the session breaks.

    Reads, and writes that never left this host, are retried on a fresh session. A
    write whose session broke before its reply is in doubt (§3.7): new writes wait,
    and it is reissued on the new session only once the old one is known drained (see
    `quiesce`); without that proof it fails with EIO and so does every later write,
    because a stale copy could still land over newer data.
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
        quiesce_timeout: float,
        request_lifetime_bound: float | None,
        fence_server: FenceServerHook | None = None,
    ) -> None:
        self.fence_server = fence_server
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
        self.quiesce_timeout = quiesce_timeout
        self.request_lifetime_bound = request_lifetime_bound
        self.fenced: str | None = None
        self.write_poison: str | None = None
        self._reconnect_lock = trio.Lock()
        self._guarantees: dict[NbdConnection, tuple[trio.Event, list[str | None]]] = {}
        self._resolving = 0
        self._resolved = trio.Event()
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
        quiesce_timeout: float = 60.0,
        request_lifetime_bound: float | None = None,
        fence_server: FenceServerHook | None = None,
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
            quiesce_timeout=quiesce_timeout,
            request_lifetime_bound=request_lifetime_bound,
            fence_server=fence_server,
        )

    @property
    def wwid(self) -> str | None:
        return self.props.wwid

    async def _connection(self) -> NbdConnection:
        if self._closed:
            raise DeviceError(errno.EBADF, f"{self.name}: device is closed")
        if self.fenced is not None:
            raise FencedError(f"{self.name}: this node is fenced ({self.fenced})")
        if not self._conn.broken:
            return self._conn
        async with self._reconnect_lock:
            if self._conn.broken:
                try:
                    conn = await NbdConnection.connect(
                        self.target,
                        export_name_for(self.target, self._identity),
                        timeout=self.connect_timeout,
                    )
                except FencedError as e:
                    self._self_fence(e)
                    raise
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

    def _self_fence(self, failure: FencedError) -> None:
        if self.fenced is None:
            self.fenced = failure.strerror or "EPERM"
            log.critical("%s: FENCED: %s; failing all I/O", self.name, self.fenced)

    async def _submit(self, command: Cmd, offset: int, length: int, **kw: object) -> bytes:
        mutating = command in MUTATING
        if mutating:
            if self.write_poison is not None:
                raise DeviceError(errno.EIO, f"{self.name}: writes stopped: {self.write_poison}")
            while self._resolving:  # in-doubt writes are being settled: keep order
                await self._resolved.wait()
        conn = await self._connection()
        try:
            return await conn.submit(command, offset, length, timeout=self.io_timeout, **kw)  # type: ignore[arg-type]
        except FencedError as e:
            self._self_fence(e)
            raise
        except PathError as e:
            if mutating and e.sent:
                return await self._reissue_in_doubt(conn, e, command, offset, length, kw)
            if mutating and e.errno == errno.EIO:
                raise DeviceError(errno.EIO, e.strerror or "I/O error") from None
            # Never sent, or a read: safe to run once more on a fresh session.
            conn = await self._connection()
            return await conn.submit(command, offset, length, timeout=self.io_timeout, **kw)  # type: ignore[arg-type]

    async def _reissue_in_doubt(
        self,
        old: NbdConnection,
        failure: PathError,
        command: Cmd,
        offset: int,
        length: int,
        kw: dict[str, object],
    ) -> bytes:
        payload = kw.get("payload")
        if payload is not None and not isinstance(payload, bytes):
            # Pin the data now: a caller that gives up must not change what is reissued.
            kw = {**kw, "payload": bytes(payload)}  # type: ignore[call-overload]
        self._resolving += 1
        try:
            how = await self._guarantee_for(old)
            if how is None:
                if self.write_poison is None:
                    self.write_poison = (
                        f"{command.name} in doubt after {failure.strerror}, and no drain "
                        f"confirmation within {self.quiesce_timeout:g}s"
                    )
                    log.critical("%s: %s", self.name, self.write_poison)
                raise DeviceError(errno.EIO, f"{self.name}: {self.write_poison}")
            log.warning("%s: old session quiesced (%s); reissuing %s", self.name, how, command.name)
            conn = await self._connection()
            try:
                return await conn.submit(command, offset, length, timeout=self.io_timeout, **kw)  # type: ignore[arg-type]
            except PathError as e:
                raise DeviceError(
                    errno.EIO, f"{self.name}: reissued {command.name} failed: {e.strerror}"
                ) from None
        finally:
            self._resolving -= 1
            if not self._resolving:
                self._resolved.set()
                self._resolved = trio.Event()

    async def _guarantee_for(self, old: NbdConnection) -> str | None:
        """One quiesce attempt per broken session, shared by all its in-doubt requests."""
        entry = self._guarantees.get(old)
        if entry is not None:
            await entry[0].wait()
            return entry[1][0]
        done: trio.Event = trio.Event()
        result: list[str | None] = [None]
        self._guarantees[old] = (done, result)
        try:
            result[0] = await obtain_quiesce_guarantee(
                self.target,
                old.session_id,
                old.local_address,
                control_tls=old.tls_context,
                fence_server=self.fence_server,
                control_timeout=max(2.0, self.io_timeout),
                timeout=self.quiesce_timeout,
                retry_interval=1.0,
                lifetime_bound=self.request_lifetime_bound,
                is_fenced=lambda: self.fenced is not None,
            )
        finally:
            done.set()
        return result[0]

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
