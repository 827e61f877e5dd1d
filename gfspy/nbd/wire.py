"""NBD wire format: constants and pure encoders/decoders for both sides.

Nothing here does I/O or keeps state; the server machine (`server_proto`) and the client
machine (`gfspy.blockdev`) both build on these so that a byte layout is written once.
Integers are big-endian and strings UTF-8 without NUL, as the NBD protocol says.

Identity convention shared by gfspy-blockd and the gfspy NBD client: the export name may
carry the opener's cluster identity as ``NAME@NODE:INCARNATIONHEX`` (see
`format_export_name` / `parse_export_name`).  A plain ``NAME`` is also accepted, so
standard clients (nbdinfo, nbdcopy, qemu-img) keep working.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

# --- magics -------------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT", also prefixes every option request
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# --- sizes and limits ---------------------------------------------------------------

GREETING_SIZE = 18
CLIENT_FLAGS_SIZE = 4
OPTION_HEADER_SIZE = 16
OPTION_REPLY_HEADER_SIZE = 20
REQUEST_HEADER_SIZE = 28
SIMPLE_REPLY_SIZE = 16
STRUCTURED_REPLY_HEADER_SIZE = 20
EXPORT_NAME_REPLY_SIZE = 10  # size(8) + transmission flags(2)
EXPORT_NAME_ZERO_PAD = 124  # sent after EXPORT_NAME unless NO_ZEROES was agreed

MAX_STRING = 4096  # the protocol's hard limit on any string
MAX_OPTION_DATA = 64 * 1024  # anything longer than this is treated as abuse
DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024  # payloads up to this must never count as DoS
NBD_DEFAULT_PORT = 10809


class HandshakeFlag(enum.IntFlag):
    """Flags in the server greeting."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    """Flags the client sends back after the greeting."""

    C_FIXED_NEWSTYLE = 1 << 0
    C_NO_ZEROES = 1 << 1


class Opt(enum.IntEnum):
    """Option numbers used during haggling."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


REP_ERROR_BIT = 1 << 31


class Rep(enum.IntEnum):
    """Option reply types; error types have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = REP_ERROR_BIT | 1
    ERR_POLICY = REP_ERROR_BIT | 2
    ERR_INVALID = REP_ERROR_BIT | 3
    ERR_PLATFORM = REP_ERROR_BIT | 4
    ERR_TLS_REQD = REP_ERROR_BIT | 5
    ERR_UNKNOWN = REP_ERROR_BIT | 6
    ERR_SHUTDOWN = REP_ERROR_BIT | 7
    ERR_BLOCK_SIZE_REQD = REP_ERROR_BIT | 8
    ERR_TOO_BIG = REP_ERROR_BIT | 9
    ERR_EXT_HEADER_REQD = REP_ERROR_BIT | 10


def is_error_reply(reply_type: int) -> bool:
    """True for any error reply type, known or not."""
    return bool(reply_type & REP_ERROR_BIT)


class InfoType(enum.IntEnum):
    """Information items carried in NBD_REP_INFO."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TransmissionFlag(enum.IntFlag):
    """Per-export flags sent with the export size."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Cmd(enum.IntEnum):
    """Transmission-phase command types."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CmdFlag(enum.IntFlag):
    """Command flags."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


class NbdErrno(enum.IntEnum):
    """Error values on the wire (they match Linux errno numbers)."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class ReplyChunkType(enum.IntEnum):
    """Structured reply chunk types (decoded by clients talking to other servers)."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = 0x8001
    ERROR_OFFSET = 0x8002


STRUCTURED_FLAG_DONE = 1


class WireError(ValueError):
    """Bytes that cannot be a valid NBD message (bad magic, bad length, bad layout)."""


# --- struct layouts -----------------------------------------------------------------

_GREETING = struct.Struct(">QQH")
_CLIENT_FLAGS = struct.Struct(">I")
_OPTION_HEADER = struct.Struct(">QII")
_OPTION_REPLY_HEADER = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_STRUCTURED_HEADER = struct.Struct(">IHHQI")
_EXPORT_NAME_REPLY = struct.Struct(">QH")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")


# --- handshake ----------------------------------------------------------------------


def encode_greeting(flags: int = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES) -> bytes:
    return _GREETING.pack(NBDMAGIC, IHAVEOPT, flags)


def decode_greeting(data: bytes) -> int:
    """Return the handshake flags; refuse oldstyle and anything that is not NBD."""
    if len(data) != GREETING_SIZE:
        raise WireError(f"greeting must be {GREETING_SIZE} bytes, got {len(data)}")
    magic, opt_magic, flags = _GREETING.unpack(data)
    if magic != NBDMAGIC:
        raise WireError("not an NBD server (bad NBDMAGIC)")
    if opt_magic != IHAVEOPT:
        raise WireError("server speaks oldstyle negotiation, which is not supported")
    return flags


def encode_client_flags(flags: int = ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES) -> bytes:
    return _CLIENT_FLAGS.pack(flags)


def decode_client_flags(data: bytes) -> int:
    if len(data) != CLIENT_FLAGS_SIZE:
        raise WireError("client flags must be 4 bytes")
    return _CLIENT_FLAGS.unpack(data)[0]


@dataclass(frozen=True)
class OptionHeader:
    opt: int
    length: int


def encode_option(opt: int, data: bytes = b"") -> bytes:
    return _OPTION_HEADER.pack(IHAVEOPT, opt, len(data)) + data


def decode_option_header(data: bytes) -> OptionHeader:
    if len(data) != OPTION_HEADER_SIZE:
        raise WireError("option header must be 16 bytes")
    magic, opt, length = _OPTION_HEADER.unpack(data)
    if magic != IHAVEOPT:
        raise WireError(f"bad option magic {magic:#018x}")
    return OptionHeader(opt, length)


@dataclass(frozen=True)
class OptionReplyHeader:
    opt: int
    reply_type: int
    length: int


def encode_option_reply(opt: int, reply_type: int, data: bytes = b"") -> bytes:
    return _OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, opt, reply_type, len(data)) + data


def decode_option_reply_header(data: bytes) -> OptionReplyHeader:
    if len(data) != OPTION_REPLY_HEADER_SIZE:
        raise WireError("option reply header must be 20 bytes")
    magic, opt, reply_type, length = _OPTION_REPLY_HEADER.unpack(data)
    if magic != OPTION_REPLY_MAGIC:
        raise WireError(f"bad option reply magic {magic:#018x}")
    return OptionReplyHeader(opt, reply_type, length)


def _decode_str(data: bytes, what: str) -> str:
    if len(data) > MAX_STRING:
        raise WireError(f"{what} longer than {MAX_STRING} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError(f"{what} is not UTF-8") from None


def encode_info_request(name: str, info_requests: list[int] | tuple[int, ...] = ()) -> bytes:
    """Data of an INFO or GO option: the export name and the info items wanted."""
    raw = name.encode("utf-8")
    parts = [struct.pack(">I", len(raw)), raw, struct.pack(">H", len(info_requests))]
    parts.extend(struct.pack(">H", code) for code in info_requests)
    return b"".join(parts)


def decode_info_request(data: bytes) -> tuple[str, list[int]]:
    """Parse INFO/GO data; lengths must add up exactly."""
    if len(data) < 6:
        raise WireError("INFO/GO data shorter than 6 bytes")
    (name_len,) = struct.unpack_from(">I", data, 0)
    if 4 + name_len + 2 > len(data):
        raise WireError("INFO/GO name length runs past the option data")
    name = _decode_str(data[4 : 4 + name_len], "export name")
    (count,) = struct.unpack_from(">H", data, 4 + name_len)
    rest = data[6 + name_len :]
    if len(rest) != 2 * count:
        raise WireError("INFO/GO request count does not match the option length")
    codes = [struct.unpack_from(">H", rest, 2 * i)[0] for i in range(count)]
    return name, codes


def encode_info_export(size: int, flags: int) -> bytes:
    return _INFO_EXPORT.pack(InfoType.EXPORT, size, flags)


def encode_info_name(name: str) -> bytes:
    return struct.pack(">H", InfoType.NAME) + name.encode("utf-8")


def encode_info_description(text: str) -> bytes:
    return struct.pack(">H", InfoType.DESCRIPTION) + text.encode("utf-8")


@dataclass(frozen=True)
class BlockSize:
    """Block-size constraints: minimum, preferred and maximum payload, in bytes."""

    minimum: int
    preferred: int
    maximum: int


def encode_info_block_size(bs: BlockSize) -> bytes:
    return _INFO_BLOCK_SIZE.pack(InfoType.BLOCK_SIZE, bs.minimum, bs.preferred, bs.maximum)


@dataclass(frozen=True)
class ExportInfo:
    size: int
    flags: int


InfoItem = ExportInfo | BlockSize | tuple[int, str] | tuple[int, bytes]


def decode_info(data: bytes) -> InfoItem:
    """Decode NBD_REP_INFO data.

    Returns ExportInfo, BlockSize, (InfoType.NAME|DESCRIPTION, text), or for unknown
    types (type, raw bytes) so the caller can ignore it as the protocol requires.
    """
    if len(data) < 2:
        raise WireError("NBD_REP_INFO shorter than 2 bytes")
    (kind,) = struct.unpack_from(">H", data, 0)
    if kind == InfoType.EXPORT:
        if len(data) != _INFO_EXPORT.size:
            raise WireError("NBD_INFO_EXPORT must be 12 bytes")
        _, size, flags = _INFO_EXPORT.unpack(data)
        return ExportInfo(size, flags)
    if kind == InfoType.BLOCK_SIZE:
        if len(data) != _INFO_BLOCK_SIZE.size:
            raise WireError("NBD_INFO_BLOCK_SIZE must be 14 bytes")
        _, minimum, preferred, maximum = _INFO_BLOCK_SIZE.unpack(data)
        return BlockSize(minimum, preferred, maximum)
    if kind in (InfoType.NAME, InfoType.DESCRIPTION):
        return (kind, _decode_str(data[2:], "info text"))
    return (kind, bytes(data[2:]))


def encode_rep_server(name: str, description: str = "") -> bytes:
    """Data of one NBD_REP_SERVER reply to LIST."""
    raw = name.encode("utf-8")
    return struct.pack(">I", len(raw)) + raw + description.encode("utf-8")


def decode_rep_server(data: bytes) -> tuple[str, str]:
    if len(data) < 4:
        raise WireError("NBD_REP_SERVER shorter than 4 bytes")
    (n,) = struct.unpack_from(">I", data, 0)
    if 4 + n > len(data):
        raise WireError("NBD_REP_SERVER name runs past the reply")
    return _decode_str(data[4 : 4 + n], "export name"), _decode_str(data[4 + n :], "description")


def encode_export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    """The reply to a successful EXPORT_NAME (which has no option-reply framing)."""
    pad = b"" if no_zeroes else bytes(EXPORT_NAME_ZERO_PAD)
    return _EXPORT_NAME_REPLY.pack(size, flags) + pad


def decode_export_name_reply(data: bytes) -> ExportInfo:
    if len(data) != EXPORT_NAME_REPLY_SIZE:
        raise WireError("EXPORT_NAME reply must be 10 bytes")
    size, flags = _EXPORT_NAME_REPLY.unpack(data)
    return ExportInfo(size, flags)


# --- transmission -------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One transmission request header (WRITE payload travels separately)."""

    flags: int
    type: int
    cookie: int
    offset: int
    length: int


def encode_request(req: Request) -> bytes:
    return _REQUEST.pack(REQUEST_MAGIC, req.flags, req.type, req.cookie, req.offset, req.length)


def decode_request(data: bytes) -> Request:
    if len(data) != REQUEST_HEADER_SIZE:
        raise WireError("request header must be 28 bytes")
    magic, flags, kind, cookie, offset, length = _REQUEST.unpack(data)
    if magic != REQUEST_MAGIC:
        raise WireError(f"bad request magic {magic:#010x}")
    return Request(flags, kind, cookie, offset, length)


@dataclass(frozen=True)
class SimpleReply:
    error: int
    cookie: int


def encode_simple_reply(error: int, cookie: int) -> bytes:
    return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def peek_reply_magic(data: bytes) -> int:
    """The first 4 bytes of a reply: tells simple from structured."""
    if len(data) < 4:
        raise WireError("need 4 bytes to read a reply magic")
    return struct.unpack_from(">I", data, 0)[0]


def decode_simple_reply(data: bytes) -> SimpleReply:
    if len(data) != SIMPLE_REPLY_SIZE:
        raise WireError("simple reply must be 16 bytes")
    magic, error, cookie = _SIMPLE_REPLY.unpack(data)
    if magic != SIMPLE_REPLY_MAGIC:
        raise WireError(f"bad simple reply magic {magic:#010x}")
    return SimpleReply(error, cookie)


@dataclass(frozen=True)
class StructuredReplyHeader:
    flags: int
    type: int
    cookie: int
    length: int


def decode_structured_reply_header(data: bytes) -> StructuredReplyHeader:
    if len(data) != STRUCTURED_REPLY_HEADER_SIZE:
        raise WireError("structured reply header must be 20 bytes")
    magic, flags, kind, cookie, length = _STRUCTURED_HEADER.unpack(data)
    if magic != STRUCTURED_REPLY_MAGIC:
        raise WireError(f"bad structured reply magic {magic:#010x}")
    return StructuredReplyHeader(flags, kind, cookie, length)


# --- identity in the export name ----------------------------------------------------


@dataclass(frozen=True)
class ExportIdentity:
    """An export name split into the export and the opener's declared identity."""

    export: str
    node: str | None = None
    incarnation: int | None = None


def format_export_name(export: str, node: str, incarnation: int) -> str:
    """``NAME@NODE:INCARNATIONHEX``: how a gfspy client names itself to gfspy-blockd."""
    if "@" in node or ":" in node or not node:
        raise ValueError(f"node name {node!r} must be non-empty without '@' or ':'")
    if not 0 <= incarnation < 1 << 64:
        raise ValueError("incarnation must be a 64-bit unsigned value")
    return f"{export}@{node}:{incarnation:x}"


def parse_export_name(full: str) -> ExportIdentity:
    """Split ``NAME[@NODE:INCARNATIONHEX]``; raise ValueError on a malformed suffix."""
    export, at, ident = full.rpartition("@")
    if not at:
        return ExportIdentity(full)
    node, colon, inc_hex = ident.partition(":")
    if not colon or not node or not inc_hex:
        raise ValueError(f"identity {ident!r} is not NODE:INCARNATIONHEX")
    try:
        incarnation = int(inc_hex, 16)
    except ValueError:
        raise ValueError(f"incarnation {inc_hex!r} is not hexadecimal") from None
    if not 0 <= incarnation < 1 << 64:
        raise ValueError("incarnation does not fit 64 bits")
    return ExportIdentity(export, node, incarnation)
