"""Server side of NBD as a sans-IO state machine: bytes in, events out.

The machine owns framing, option haggling rules and request validation; it knows
nothing of sockets, exports or fencing.  Decisions that need server state (which exports
exist, who may open them) are surfaced as events and answered by calling a method, as
h11 does it, so every protocol rule can be unit-tested by feeding bytes.

Usage: `receive_data()` the bytes read, loop `next_event()` until `NEED_DATA`, send
`data_to_send()`.  After `ProtocolError` or a refused EXPORT_NAME the connection must be
closed.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gfspy.nbd import wire
from gfspy.nbd.wire import (
    ClientFlag,
    Cmd,
    CmdFlag,
    NbdErrno,
    Opt,
    Rep,
    TransmissionFlag,
    WireError,
)

log = logging.getLogger(__name__)


class TLSMode(enum.Enum):
    NONE = "none"  # STARTTLS is refused
    FORCED = "forced"  # nothing but STARTTLS and ABORT until TLS is up


class State(enum.Enum):
    AWAIT_CLIENT_FLAGS = "await-client-flags"
    OPTIONS = "options"
    AWAIT_DECISION = "await-decision"  # an event waits for the application's answer
    AWAIT_TLS = "await-tls"  # the application must run the TLS handshake
    TRANSMISSION = "transmission"
    DONE = "done"  # DISC, ABORT, refusal or violation: read nothing more


Payload = bytes | bytearray | memoryview


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


@dataclass(frozen=True)
class ExportRequested:
    """INFO, GO or EXPORT_NAME for `name`: answer with accept_export or refuse_export."""

    opt: Opt
    name: str
    info_requests: tuple[int, ...] = ()


@dataclass(frozen=True)
class ListRequested:
    """LIST: answer with send_list."""


@dataclass(frozen=True)
class StartTLSRequested:
    """ACK is queued: send it, run the TLS handshake, then call tls_established."""


@dataclass(frozen=True)
class AbortRequested:
    """ACK is queued: send it and close."""


@dataclass(frozen=True)
class Command:
    """A valid request to execute; `payload` is the WRITE data.

    The payload is a memoryview over a buffer from the connection's `allocate_payload`,
    so the application can hand it to the disk without another copy.
    """

    request: wire.Request
    payload: Payload = b""


@dataclass(frozen=True)
class CommandRejected:
    """A request that failed validation: reply `error` and do not execute it."""

    request: wire.Request
    error: NbdErrno
    reason: str
    payload: Payload = b""  # a rejected WRITE's data, only so its buffer can be reused


@dataclass(frozen=True)
class DisconnectRequested:
    """NBD_CMD_DISC: finish what is in flight, then close."""


@dataclass(frozen=True)
class ProtocolError:
    """The peer broke a MUST (or looks abusive); close the connection now."""

    reason: str


Event = (
    ExportRequested
    | ListRequested
    | StartTLSRequested
    | AbortRequested
    | Command
    | CommandRejected
    | DisconnectRequested
    | ProtocolError
)

# Plain ints: `~` on an IntFlag only inverts the defined bits, hiding unknown ones.
_KNOWN_CLIENT_FLAGS = int(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)
# Flags that each command accepts; FUA is accepted everywhere, as the spec requires.
_ALLOWED_FLAGS: dict[int, int] = {
    Cmd.READ: int(CmdFlag.FUA),
    Cmd.WRITE: int(CmdFlag.FUA),
    Cmd.FLUSH: int(CmdFlag.FUA),
    Cmd.TRIM: int(CmdFlag.FUA),
    Cmd.WRITE_ZEROES: int(CmdFlag.FUA | CmdFlag.NO_HOLE),
}


@dataclass
class _Export:
    size: int
    flags: int
    block_size: wire.BlockSize


@dataclass
class ServerConnection:
    """One client connection as seen by the server.

    `allocate_payload(n)` returns a writable buffer of at least n bytes for WRITE data;
    while a payload is being received, `payload_receive_buffer` exposes the part still
    missing so the I/O layer may receive straight into it.
    """

    tls_mode: TLSMode = TLSMode.NONE
    state: State = State.AWAIT_CLIENT_FLAGS
    tls_active: bool = False
    no_zeroes: bool = False
    shutting_down: bool = False
    export: _Export | None = None
    _inbuf: bytearray = field(default_factory=bytearray)
    _outbuf: bytearray = field(default_factory=bytearray)
    _pending: ExportRequested | ListRequested | None = None
    allocate_payload: Callable[[int], Any] = bytearray
    _write: wire.Request | None = None  # a WRITE whose payload is still arriving
    _payload: memoryview | None = None
    _payload_filled: int = 0

    def __post_init__(self) -> None:
        self._outbuf += wire.encode_greeting()

    # --- I/O glue ---------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self.state is State.DONE:
            return
        if self._payload is not None:
            take = min(len(data), len(self._payload) - self._payload_filled)
            self._payload[self._payload_filled : self._payload_filled + take] = data[:take]
            self._payload_filled += take
            data = data[take:]
        if data:
            self._inbuf += data

    def payload_receive_buffer(self) -> memoryview | None:
        """The still-empty tail of the WRITE payload being received, if any."""
        if self._payload is None or self._payload_filled == len(self._payload):
            return None
        return self._payload[self._payload_filled :]

    def payload_received(self, n: int) -> None:
        """`n` bytes were received directly into `payload_receive_buffer()`."""
        assert self._payload is not None and self._payload_filled + n <= len(self._payload)
        self._payload_filled += n

    def data_to_send(self) -> bytes:
        out = bytes(self._outbuf)
        self._outbuf.clear()
        return out

    def _take(self, n: int) -> bytes | None:
        if len(self._inbuf) < n:
            return None
        chunk = bytes(self._inbuf[:n])
        del self._inbuf[:n]
        return chunk

    def _fail(self, reason: str) -> ProtocolError:
        self.state = State.DONE
        self._inbuf.clear()
        return ProtocolError(reason)

    # --- event loop -------------------------------------------------------------

    def next_event(self) -> Event | _NeedData:
        """Parse as much input as one event needs; NEED_DATA if it is not here yet."""
        if self.state is State.AWAIT_CLIENT_FLAGS:
            return self._client_flags()
        if self.state is State.OPTIONS:
            return self._option()
        if self.state is State.TRANSMISSION:
            return self._request()
        return NEED_DATA  # waiting for the application, or finished

    def _client_flags(self) -> Event | _NeedData:
        raw = self._take(wire.CLIENT_FLAGS_SIZE)
        if raw is None:
            return NEED_DATA
        flags = wire.decode_client_flags(raw)
        if flags & ~_KNOWN_CLIENT_FLAGS:
            return self._fail(f"client set unknown handshake flags {flags:#x}")
        if not flags & ClientFlag.C_FIXED_NEWSTYLE:
            return self._fail("client does not speak fixed newstyle")
        self.no_zeroes = bool(flags & ClientFlag.C_NO_ZEROES)
        self.state = State.OPTIONS
        return self._option()

    def _option(self) -> Event | _NeedData:
        while True:
            if len(self._inbuf) < wire.OPTION_HEADER_SIZE:
                return NEED_DATA
            try:
                header = wire.decode_option_header(bytes(self._inbuf[: wire.OPTION_HEADER_SIZE]))
            except WireError as e:
                return self._fail(str(e))
            if header.length > wire.MAX_OPTION_DATA:
                return self._fail(f"option {header.opt} data of {header.length} bytes is too big")
            raw = self._take(wire.OPTION_HEADER_SIZE + header.length)
            if raw is None:
                return NEED_DATA
            event = self._handle_option(header.opt, raw[wire.OPTION_HEADER_SIZE :])
            if event is not None:
                return event

    def _reply(self, opt: int, reply_type: int, data: bytes = b"") -> None:
        self._outbuf += wire.encode_option_reply(opt, reply_type, data)

    def _error(self, opt: int, reply_type: Rep, message: str) -> None:
        log.debug("option %d refused with %s: %s", opt, reply_type.name, message)
        self._reply(opt, reply_type, message.encode("utf-8"))

    def _handle_option(self, opt: int, data: bytes) -> Event | None:
        """Answer what the protocol alone decides; return an event for the rest."""
        if opt == Opt.ABORT:
            self._reply(opt, Rep.ACK)
            self.state = State.DONE
            return AbortRequested()
        if opt == Opt.EXPORT_NAME:
            if self._tls_missing() or self.shutting_down:
                return self._fail("EXPORT_NAME refused (TLS required or shutting down)")
            try:
                name = data.decode("utf-8")
            except UnicodeDecodeError:
                return self._fail("EXPORT_NAME is not UTF-8")
            return self._await(ExportRequested(Opt.EXPORT_NAME, name))
        if self.shutting_down:
            self._error(opt, Rep.ERR_SHUTDOWN, "server is shutting down")
            return None
        if opt == Opt.STARTTLS:
            return self._starttls(data)
        if self._tls_missing():
            self._error(opt, Rep.ERR_TLS_REQD, "TLS is required: send STARTTLS first")
            return None
        if opt == Opt.LIST:
            if data:
                self._error(opt, Rep.ERR_INVALID, "LIST takes no data")
                return None
            return self._await(ListRequested())
        if opt in (Opt.INFO, Opt.GO):
            try:
                name, codes = wire.decode_info_request(data)
            except WireError as e:
                self._error(opt, Rep.ERR_INVALID, str(e))
                return None
            return self._await(ExportRequested(Opt(opt), name, tuple(codes)))
        self._error(opt, Rep.ERR_UNSUP, f"option {opt} is not supported")
        return None

    def _tls_missing(self) -> bool:
        return self.tls_mode is TLSMode.FORCED and not self.tls_active

    def _starttls(self, data: bytes) -> Event | None:
        opt = Opt.STARTTLS
        if self.tls_mode is TLSMode.NONE:
            self._error(opt, Rep.ERR_UNSUP, "this server does not offer TLS")
        elif self.tls_active:
            self._error(opt, Rep.ERR_INVALID, "TLS is already active")
        elif data:
            self._error(opt, Rep.ERR_INVALID, "STARTTLS takes no data")
        elif self._inbuf:
            # The client must wait for our ACK before its TLS hello; bytes already here
            # would be lost under TLS, so this is a violation, not something to guess at.
            return self._fail("client sent data after STARTTLS before the ACK")
        else:
            self._reply(opt, Rep.ACK)
            self.state = State.AWAIT_TLS
            return StartTLSRequested()
        return None

    def _await(self, event: ExportRequested | ListRequested) -> Event:
        self._pending = event
        self.state = State.AWAIT_DECISION
        return event

    # --- the application's answers ----------------------------------------------

    def _answered(self, expected: type) -> ExportRequested | ListRequested:
        pending = self._pending
        if self.state is not State.AWAIT_DECISION or not isinstance(pending, expected):
            raise RuntimeError(f"no {expected.__name__} is waiting for an answer")
        self._pending = None
        return pending

    def tls_established(self) -> None:
        """The TLS handshake succeeded: haggling restarts with no earlier state."""
        if self.state is not State.AWAIT_TLS:
            raise RuntimeError("no STARTTLS in progress")
        self.tls_active = True
        self.state = State.OPTIONS

    def send_list(self, exports: list[tuple[str, str]]) -> None:
        self._answered(ListRequested)
        for name, description in exports:
            self._reply(Opt.LIST, Rep.SERVER, wire.encode_rep_server(name, description))
        self._reply(Opt.LIST, Rep.ACK)
        self.state = State.OPTIONS

    def accept_export(
        self,
        size: int,
        flags: int,
        block_size: wire.BlockSize,
        *,
        canonical_name: str | None = None,
        description: str | None = None,
    ) -> None:
        """Answer the pending INFO/GO/EXPORT_NAME with the export's details."""
        event = self._answered(ExportRequested)
        assert isinstance(event, ExportRequested)
        flags |= TransmissionFlag.HAS_FLAGS
        if event.opt == Opt.EXPORT_NAME:
            self._outbuf += wire.encode_export_name_reply(size, flags, self.no_zeroes)
        else:
            # BLOCK_SIZE is sent even unasked: we enforce non-default limits.
            self._reply(event.opt, Rep.INFO, wire.encode_info_export(size, flags))
            self._reply(event.opt, Rep.INFO, wire.encode_info_block_size(block_size))
            if wire.InfoType.NAME in event.info_requests and canonical_name is not None:
                self._reply(event.opt, Rep.INFO, wire.encode_info_name(canonical_name))
            if wire.InfoType.DESCRIPTION in event.info_requests and description:
                self._reply(event.opt, Rep.INFO, wire.encode_info_description(description))
            self._reply(event.opt, Rep.ACK)
        if event.opt == Opt.INFO:
            self.state = State.OPTIONS
        else:
            self.export = _Export(size, flags, block_size)
            self.state = State.TRANSMISSION

    def refuse_export(self, reply_type: Rep, message: str) -> None:
        """Refuse the pending request; an EXPORT_NAME can only be refused by closing."""
        event = self._answered(ExportRequested)
        assert isinstance(event, ExportRequested)
        if event.opt == Opt.EXPORT_NAME:
            self.state = State.DONE
            return
        self._error(event.opt, reply_type, message)
        self.state = State.OPTIONS

    # --- transmission -----------------------------------------------------------

    def _request(self) -> Event | _NeedData:
        if self._write is not None:
            assert self._payload is not None
            if self._payload_filled < len(self._payload):
                return NEED_DATA
            req, payload = self._write, self._payload
            self._write = self._payload = None
            return self._command(req, payload)
        if len(self._inbuf) < wire.REQUEST_HEADER_SIZE:
            return NEED_DATA
        try:
            req = wire.decode_request(bytes(self._inbuf[: wire.REQUEST_HEADER_SIZE]))
        except WireError as e:
            return self._fail(str(e))
        assert self.export is not None
        del self._inbuf[: wire.REQUEST_HEADER_SIZE]
        if req.type != Cmd.WRITE:
            return self._command(req, b"")
        if req.length > self.export.block_size.maximum:
            return self._fail(f"WRITE payload of {req.length} bytes exceeds the maximum")
        payload = memoryview(self.allocate_payload(req.length))[: req.length]
        take = min(len(self._inbuf), req.length)
        with memoryview(self._inbuf) as view:
            payload[:take] = view[:take]
        del self._inbuf[:take]
        if take < req.length:
            self._write, self._payload, self._payload_filled = req, payload, take
            return NEED_DATA
        return self._command(req, payload)

    def _command(self, req: wire.Request, payload: Payload) -> Event:
        if req.type == Cmd.DISC:
            self.state = State.DONE
            self._inbuf.clear()
            return DisconnectRequested()
        problem = self._validate(req)
        if problem is not None:
            error, reason = problem
            return CommandRejected(req, error, reason, payload)
        return Command(req, payload)

    def _validate(self, req: wire.Request) -> tuple[NbdErrno, str] | None:
        export = self.export
        assert export is not None
        allowed = _ALLOWED_FLAGS.get(req.type)
        if allowed is None:
            return NbdErrno.EINVAL, f"unsupported command {req.type}"
        if req.flags & ~allowed:
            return NbdErrno.EINVAL, f"flags {req.flags:#x} not valid for command {req.type}"
        if req.type == Cmd.FLUSH:
            return None
        writes = req.type in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES)
        if writes and export.flags & TransmissionFlag.READ_ONLY:
            return NbdErrno.EPERM, "export is read-only"
        minimum = export.block_size.minimum
        if req.offset % minimum or req.length % minimum:
            return NbdErrno.EINVAL, f"I/O at {req.offset}+{req.length} not aligned to {minimum}"
        if req.type == Cmd.READ and req.length > export.block_size.maximum:
            return NbdErrno.EINVAL, f"READ of {req.length} bytes exceeds the maximum"
        if req.offset + req.length > export.size:
            past_end = NbdErrno.ENOSPC if req.type in (Cmd.WRITE, Cmd.WRITE_ZEROES) else None
            return past_end or NbdErrno.EINVAL, f"I/O at {req.offset}+{req.length} past the end"
        return None
