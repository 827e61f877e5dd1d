"""The NBD client as a sans-IO state machine: bytes in, events out (h11 style).

It does the fixed-newstyle handshake (GO asking for BLOCK_SIZE, NAME and DESCRIPTION,
falling back to EXPORT_NAME for servers without GO) and then the transmission phase with
many requests in flight keyed by cookie. It never negotiates structured replies, so every
reply is a simple one and the machine must remember which cookies were READs to know how
many payload bytes follow.

Keeping the protocol free of I/O is what lets the tests feed it hostile servers byte by
byte, and lets the trio transport (`nbd.py`) stay a thin pump.
"""

from __future__ import annotations

import enum
import errno
import logging
from collections import deque
from dataclasses import dataclass, field

from gfspy.nbd import wire
from gfspy.nbd.wire import Cmd, CmdFlag, InfoType, Opt, Rep, TransmissionFlag

log = logging.getLogger(__name__)

#: Payloads this large are sent as their own buffer rather than copied behind the header.
SEPARATE_PAYLOAD = 64 * 1024
#: Info items asked for in GO: block size limits, canonical name, description (WWID).
INFO_REQUESTS = (InfoType.BLOCK_SIZE, InfoType.NAME, InfoType.DESCRIPTION)
#: Default limits when the server gives no NBD_INFO_BLOCK_SIZE (proto.md defaults).
DEFAULT_BLOCK_SIZE = wire.BlockSize(1, 4096, wire.DEFAULT_MAX_PAYLOAD)


class NbdProtocolError(Exception):
    """The server sent bytes that break the protocol; the connection is unusable."""


class NbdNegotiationError(OSError):
    """The server refused the export during the handshake (errno says how)."""


#: How option error replies map to errno; POLICY is how gfspy-blockd says "fenced".
_REFUSAL_ERRNO = {
    Rep.ERR_POLICY: errno.EPERM,
    Rep.ERR_UNKNOWN: errno.ENOENT,
    Rep.ERR_TLS_REQD: errno.EACCES,
    Rep.ERR_SHUTDOWN: errno.ESHUTDOWN,
    Rep.ERR_INVALID: errno.EINVAL,
    Rep.ERR_PLATFORM: errno.EOPNOTSUPP,
    Rep.ERR_UNSUP: errno.EOPNOTSUPP,
    Rep.ERR_BLOCK_SIZE_REQD: errno.EINVAL,
    Rep.ERR_TOO_BIG: errno.EFBIG,
}


class _State(enum.Enum):
    GREETING = "greeting"
    STARTTLS_REPLY = "starttls-reply"
    TLS_PENDING = "tls-pending"
    OPTION_REPLY = "option-reply"
    EXPORT_NAME_REPLY = "export-name-reply"
    TRANSMISSION = "transmission"
    CLOSED = "closed"
    ERROR = "error"


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by `next_event` when more bytes are needed.
NEED_DATA = _NeedData()


@dataclass(frozen=True)
class Negotiated:
    """The handshake finished: the export's properties as the server reported them."""

    size: int
    flags: int
    block_size: wire.BlockSize
    block_size_reported: bool
    name: str | None
    description: str | None

    @property
    def read_only(self) -> bool:
        return bool(self.flags & TransmissionFlag.READ_ONLY)

    def can(self, flag: TransmissionFlag) -> bool:
        return bool(self.flags & flag)


@dataclass(frozen=True)
class Reply:
    """The answer to one request; `error` is the NBD errno (0 = success)."""

    cookie: int
    command: int
    error: int
    data: bytes = b""


@dataclass(frozen=True)
class StartTLS:
    """The server accepted STARTTLS: wrap the stream in TLS, then call `tls_established`."""


@dataclass(frozen=True)
class ConnectionClosed:
    """The server closed the connection cleanly between frames."""

    pending: tuple[int, ...] = ()


Event = Negotiated | Reply | ConnectionClosed | StartTLS


class _ReceiveBuffer:
    """Received bytes kept as the chunks they arrived in, so a 1 MiB read payload is
    copied once (when it is taken out) rather than on every append and trim."""

    def __init__(self) -> None:
        self._chunks: deque[memoryview] = deque()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def append(self, data: bytes) -> None:
        if data:
            self._chunks.append(memoryview(data))
            self._size += len(data)

    def peek(self, n: int) -> bytes:
        """The first `n` bytes (the caller checked that many are there), not consumed."""
        out = bytearray()
        for chunk in self._chunks:
            out += chunk[: n - len(out)]
            if len(out) >= n:
                break
        return bytes(out)

    def take(self, n: int) -> bytes:
        """Remove and return the first `n` bytes (the caller checked they are there)."""
        parts = []
        remaining = n
        while remaining:
            chunk = self._chunks[0]
            if len(chunk) <= remaining:
                parts.append(self._chunks.popleft())
                remaining -= len(chunk)
            else:
                parts.append(chunk[:remaining])
                self._chunks[0] = chunk[remaining:]
                remaining = 0
        self._size -= n
        return b"".join(parts)


@dataclass
class _Inflight:
    command: int
    length: int


@dataclass
class ClientConnection:
    """One NBD connection's protocol state, from greeting to DISC."""

    export_name: str
    #: Ask for STARTTLS before anything else (nbds://); the identity then is the cert's.
    tls: bool = False
    max_option_reply: int = wire.MAX_OPTION_DATA
    _state: _State = _State.GREETING
    _buf: _ReceiveBuffer = field(default_factory=_ReceiveBuffer)
    _out: bytearray = field(default_factory=bytearray)
    _eof: bool = False
    _no_zeroes: bool = False
    _export: wire.ExportInfo | None = None
    _block_size: wire.BlockSize | None = None
    _name: str | None = None
    _description: str | None = None
    _negotiated: Negotiated | None = None
    _next_cookie: int = 1
    _inflight: dict[int, _Inflight] = field(default_factory=dict)
    _current: tuple[wire.SimpleReply, _Inflight] | None = None

    # ---- bytes in / out -----------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the socket; b"" means the server closed its side."""
        if data:
            self._buf.append(data)
        else:
            self._eof = True

    def data_to_send(self) -> bytes:
        """Handshake bytes waiting to go out (requests are returned by `request`)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def negotiated(self) -> Negotiated | None:
        return self._negotiated

    @property
    def in_transmission(self) -> bool:
        return self._state is _State.TRANSMISSION

    @property
    def inflight_count(self) -> int:
        return len(self._inflight)

    def next_event(self) -> Event | _NeedData:
        """Parse what has arrived; raise NbdProtocolError/NbdNegotiationError on trouble."""
        if self._state is _State.ERROR:
            raise NbdProtocolError("connection already failed")
        try:
            event = self._step()
        except wire.WireError as e:
            self._state = _State.ERROR
            raise NbdProtocolError(str(e)) from None
        except (NbdProtocolError, NbdNegotiationError):
            self._state = _State.ERROR
            raise
        return event

    # ---- handshake ----------------------------------------------------------------

    def _take(self, n: int) -> bytes | None:
        if len(self._buf) < n:
            return None
        return self._buf.take(n)

    def _eof_check(self, what: str) -> _NeedData:
        if self._eof:
            raise NbdProtocolError(f"server closed the connection during {what}")
        return NEED_DATA

    def _step(self) -> Event | _NeedData:
        while True:
            if self._state is _State.GREETING:
                raw = self._take(wire.GREETING_SIZE)
                if raw is None:
                    return self._eof_check("the greeting")
                self._on_greeting(raw)
            elif self._state is _State.STARTTLS_REPLY:
                event = self._on_starttls_reply()
                if event is not None:
                    return event
            elif self._state is _State.TLS_PENDING:
                return NEED_DATA
            elif self._state is _State.OPTION_REPLY:
                event = self._on_option_reply()
                if event is not None:
                    return event
            elif self._state is _State.EXPORT_NAME_REPLY:
                event = self._on_export_name_reply()
                if event is not None:
                    return event
            elif self._state is _State.TRANSMISSION:
                return self._on_transmission()
            else:  # CLOSED
                return NEED_DATA

    def _on_greeting(self, raw: bytes) -> None:
        flags = wire.decode_greeting(raw)
        if not flags & wire.HandshakeFlag.FIXED_NEWSTYLE:
            raise NbdProtocolError("server does not offer fixed newstyle negotiation")
        self._no_zeroes = bool(flags & wire.HandshakeFlag.NO_ZEROES)
        client = wire.ClientFlag.C_FIXED_NEWSTYLE
        if self._no_zeroes:
            client |= wire.ClientFlag.C_NO_ZEROES
        self._out += wire.encode_client_flags(client)
        if self.tls:
            self._out += wire.encode_option(Opt.STARTTLS)
            self._state = _State.STARTTLS_REPLY
        else:
            self._send_go()

    def _send_go(self) -> None:
        self._out += wire.encode_option(
            Opt.GO, wire.encode_info_request(self.export_name, INFO_REQUESTS)
        )
        self._state = _State.OPTION_REPLY

    def _take_option_reply(self, asked: Opt) -> tuple[wire.OptionReplyHeader, bytes] | None:
        """Take one whole reply to option `asked` off the buffer; None if it is incomplete."""
        if len(self._buf) < wire.OPTION_REPLY_HEADER_SIZE:
            return None
        header = wire.decode_option_reply_header(self._buf.peek(wire.OPTION_REPLY_HEADER_SIZE))
        if header.opt != asked:
            raise NbdProtocolError(f"reply to option {header.opt}, but {asked.name} was asked")
        if header.length > self.max_option_reply:
            raise NbdProtocolError(f"option reply of {header.length} bytes is too long")
        total = wire.OPTION_REPLY_HEADER_SIZE + header.length
        if len(self._buf) < total:
            return None
        return header, self._buf.take(total)[wire.OPTION_REPLY_HEADER_SIZE :]

    def _on_starttls_reply(self) -> Event | _NeedData | None:
        reply = self._take_option_reply(Opt.STARTTLS)
        if reply is None:
            return self._eof_check("STARTTLS")
        header, payload = reply
        if header.reply_type == Rep.ACK:
            if len(self._buf):
                # Bytes after the ACK but before the TLS handshake: an injection attempt.
                raise NbdProtocolError("plaintext data after the STARTTLS acknowledgement")
            self._state = _State.TLS_PENDING
            return StartTLS()
        message = payload.decode("utf-8", "replace")[: wire.MAX_STRING]
        raise NbdNegotiationError(
            errno.EACCES, f"server refused TLS: {message or hex(header.reply_type)}"
        )

    def tls_established(self) -> None:
        """The transport finished the TLS handshake; negotiation continues inside it."""
        if self._state is not _State.TLS_PENDING:
            raise NbdProtocolError("tls_established() without a pending STARTTLS")
        self._send_go()

    def _on_option_reply(self) -> Event | _NeedData | None:
        reply = self._take_option_reply(Opt.GO)
        if reply is None:
            return self._eof_check("option negotiation")
        header, payload = reply
        if header.reply_type == Rep.INFO:
            self._on_info(wire.decode_info(payload))
            return None
        if header.reply_type == Rep.ACK:
            if self._export is None:
                raise NbdProtocolError("GO acknowledged without NBD_INFO_EXPORT")
            return self._finish_handshake()
        if wire.is_error_reply(header.reply_type):
            if header.reply_type == Rep.ERR_UNSUP:
                # An old server without GO: the legacy option still opens the export.
                log.info("server lacks NBD_OPT_GO; falling back to EXPORT_NAME")
                self._out += wire.encode_option(Opt.EXPORT_NAME, self.export_name.encode())
                self._state = _State.EXPORT_NAME_REPLY
                return None
            message = payload.decode("utf-8", "replace")[: wire.MAX_STRING]
            err = _REFUSAL_ERRNO.get(header.reply_type, errno.EIO)
            raise NbdNegotiationError(
                err,
                f"server refused export {self.export_name!r}: {message or hex(header.reply_type)}",
            )
        # Unknown non-error reply types to GO are not allowed by the protocol.
        raise NbdProtocolError(f"unexpected reply type {header.reply_type:#x} to GO")

    def _on_info(self, item: wire.InfoItem) -> None:
        if isinstance(item, wire.ExportInfo):
            self._export = item
        elif isinstance(item, wire.BlockSize):
            _check_block_size(item)
            self._block_size = item
        elif isinstance(item, tuple) and item[0] == InfoType.NAME:
            self._name = str(item[1])
        elif isinstance(item, tuple) and item[0] == InfoType.DESCRIPTION:
            self._description = str(item[1])
        # Unknown info types are ignored, as the protocol requires.

    def _on_export_name_reply(self) -> Event | _NeedData | None:
        need = wire.EXPORT_NAME_REPLY_SIZE + (0 if self._no_zeroes else wire.EXPORT_NAME_ZERO_PAD)
        raw = self._take(need)
        if raw is None:
            if self._eof:
                raise NbdNegotiationError(
                    errno.ENOENT, f"server closed the connection for export {self.export_name!r}"
                )
            return NEED_DATA
        self._export = wire.decode_export_name_reply(raw[: wire.EXPORT_NAME_REPLY_SIZE])
        return self._finish_handshake()

    def _finish_handshake(self) -> Negotiated:
        assert self._export is not None
        if not self._export.flags & TransmissionFlag.HAS_FLAGS:
            raise NbdProtocolError("transmission flags lack HAS_FLAGS")
        block = self._block_size or DEFAULT_BLOCK_SIZE
        self._negotiated = Negotiated(
            size=self._export.size,
            flags=self._export.flags,
            block_size=block,
            block_size_reported=self._block_size is not None,
            name=self._name,
            description=self._description,
        )
        self._state = _State.TRANSMISSION
        return self._negotiated

    # ---- transmission -------------------------------------------------------------

    def request(
        self,
        command: Cmd,
        offset: int = 0,
        length: int = 0,
        *,
        flags: int = 0,
        payload: bytes | bytearray | memoryview | None = None,
    ) -> tuple[int, bytes]:
        """Encode one request; return its cookie and the bytes to send (with payload)."""
        cookie, header = self._register(command, offset, length, flags, payload)
        if payload is None:
            return cookie, header
        return cookie, b"".join((header, payload))

    def request_parts(
        self,
        command: Cmd,
        offset: int = 0,
        length: int = 0,
        *,
        flags: int = 0,
        payload: bytes | bytearray | memoryview | None = None,
    ) -> tuple[int, list[bytes | bytearray | memoryview]]:
        """Like `request`, but a large payload stays its own buffer (no 1 MiB copy)."""
        if payload is None or len(payload) < SEPARATE_PAYLOAD:
            cookie, data = self.request(command, offset, length, flags=flags, payload=payload)
            return cookie, [data]
        cookie, header = self._register(command, offset, length, flags, payload)
        return cookie, [header, payload]

    def _register(
        self,
        command: Cmd,
        offset: int,
        length: int,
        flags: int,
        payload: bytes | bytearray | memoryview | None,
    ) -> tuple[int, bytes]:
        """Check, assign a cookie, remember what the reply will carry; return the header."""
        if self._state is not _State.TRANSMISSION:
            raise NbdProtocolError(f"cannot send a request in state {self._state.value}")
        nego = self._negotiated
        assert nego is not None
        if flags & CmdFlag.FUA and not nego.can(TransmissionFlag.SEND_FUA):
            flags &= ~CmdFlag.FUA  # the server promised no FUA; caller must flush instead
        if command == Cmd.WRITE:
            if payload is None:
                raise ValueError("WRITE needs a payload")
            length = len(payload)
        elif payload is not None:
            raise ValueError("only WRITE carries a payload")
        cookie = self._next_cookie
        self._next_cookie = (self._next_cookie + 1) & 0xFFFF_FFFF_FFFF_FFFF or 1
        header = wire.encode_request(wire.Request(flags, command, cookie, offset, length))
        if command == Cmd.DISC:
            self._state = _State.CLOSED
        else:
            self._inflight[cookie] = _Inflight(int(command), length)
        return cookie, header

    def _on_transmission(self) -> Event | _NeedData:
        if self._current is None:
            if len(self._buf) < wire.SIMPLE_REPLY_SIZE:
                if self._eof:
                    if len(self._buf):
                        raise NbdProtocolError("server closed the connection mid-reply")
                    self._state = _State.CLOSED
                    return ConnectionClosed(tuple(self._inflight))
                return NEED_DATA
            head = self._buf.peek(wire.SIMPLE_REPLY_SIZE)
            magic = wire.peek_reply_magic(head)
            if magic == wire.STRUCTURED_REPLY_MAGIC:
                raise NbdProtocolError("structured reply, but none were negotiated")
            reply = wire.decode_simple_reply(head)
            inflight = self._inflight.get(reply.cookie)
            if inflight is None:
                raise NbdProtocolError(f"reply for unknown cookie {reply.cookie:#x}")
            self._buf.take(wire.SIMPLE_REPLY_SIZE)
            self._current = (reply, inflight)
        reply, inflight = self._current
        need = inflight.length if inflight.command == Cmd.READ and reply.error == 0 else 0
        if len(self._buf) < need:
            if self._eof:
                raise NbdProtocolError("server closed the connection mid-read-payload")
            return NEED_DATA
        data = b""
        if need:
            data = self._buf.take(need)
        self._current = None
        del self._inflight[reply.cookie]
        return Reply(reply.cookie, inflight.command, reply.error, data)


def _check_block_size(bs: wire.BlockSize) -> None:
    """Refuse limits no correct server sends (they would make us misalign I/O)."""

    def pow2(n: int) -> bool:
        return n > 0 and n & (n - 1) == 0

    if not pow2(bs.minimum) or bs.minimum > 65536:
        raise NbdProtocolError(f"bad minimum block size {bs.minimum}")
    if not pow2(bs.preferred) or bs.preferred < bs.minimum:
        raise NbdProtocolError(f"bad preferred block size {bs.preferred}")
    if bs.maximum < bs.minimum:
        raise NbdProtocolError(f"maximum payload {bs.maximum} below minimum {bs.minimum}")


def nbd_error_to_errno(error: int) -> int:
    """Map an NBD error value to errno; unknown values count as EINVAL per the spec."""
    known = {e.value for e in wire.NbdErrno}
    return error if error in known else errno.EINVAL
