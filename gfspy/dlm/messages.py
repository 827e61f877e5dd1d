"""Wire formats of the DLM: transport frames and lock messages, msgpack with strict checks.

Two layers, both pure:

* `FrameDecoder` turns a TCP byte stream into length-prefixed msgpack frames of the
  per-peer link (HELLO, HELLO_ACK, DATA with a sequence number, ACK).
* `encode_message` / `decode_message` handle the DLM messages carried in DATA frames.

Anything malformed, truncated, of the wrong type or out of range raises `MessageError`;
callers log it and drop the frame. A peer can never make us crash or allocate without
bound (frames are capped at `MAX_FRAME`).
"""

from __future__ import annotations

import enum
import struct
from typing import Any

import msgpack

PROTO_VERSION = 1
MAX_FRAME = 4 * 1024 * 1024
_LEN = struct.Struct(">I")


class MessageError(ValueError):
    """A frame or message that does not follow the protocol; drop it."""


# --------------------------------------------------------------------- link frames


class FrameType(enum.IntEnum):
    HELLO = 1  # node_id, incarnation, wanted peer node_id
    HELLO_ACK = 2  # node_id, incarnation, last seq received from the caller
    DATA = 3  # seq, payload
    ACK = 4  # seq


_FRAME_TYPES = {int(t): t for t in FrameType}


class _Any:
    """Marker: any value (a DATA frame's message is checked by `message_from_value`)."""


_FRAME_SHAPES: dict[int, tuple[type, ...]] = {
    FrameType.HELLO: (int, int, int),
    FrameType.HELLO_ACK: (int, int, int),
    FrameType.DATA: (int, _Any),
    FrameType.ACK: (int,),
}


def encode_frame(ftype: FrameType, *fields: Any) -> bytes:
    body = msgpack.packb([int(ftype), *fields], use_bin_type=True)
    return _LEN.pack(len(body)) + body


_DATA_PREFIX = bytes([0x93, int(FrameType.DATA)])  # msgpack: array of 3, then the type


def encode_data_frame(seq: int, message: bytes) -> bytes:
    """A DATA frame around an already-encoded message, without re-packing it.

    msgpack is self-delimiting, so the message's bytes are spliced in as the frame's
    third element: the receiver unpacks frame and message in one pass.
    """
    body = _DATA_PREFIX + msgpack.packb(seq) + message
    return _LEN.pack(len(body)) + body


def _what(what: object) -> str:
    return what.name if isinstance(what, enum.Enum) else str(what)


def _check_shape(values: list, shape: tuple[type, ...], what: object) -> None:
    """Exact type of every field (msgpack integers are 64-bit, so no range check).

    `what` names the frame or message in errors; it is only formatted on failure, since
    this runs for every message received."""
    if len(values) != len(shape):
        raise MessageError(f"{_what(what)}: {len(values)} fields, expected {len(shape)}")
    for i, value in enumerate(values):
        kind = shape[i]
        if type(value) is kind or kind is _Any:
            continue
        if kind is _OptBytes and (value is None or type(value) is bytes):
            continue
        raise MessageError(
            f"{_what(what)}: field {i} is {type(value).__name__}, expected {kind.__name__}"
        )


def decode_frame_body(body: bytes) -> tuple[FrameType, list]:
    try:
        value = msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise MessageError(f"undecodable frame: {exc.__class__.__name__}") from None
    if type(value) is not list or not value or type(value[0]) is not int:
        raise MessageError("frame is not a typed array")
    ftype = _FRAME_TYPES.get(value[0])
    if ftype is None:
        raise MessageError(f"unknown frame type {value[0]}")
    fields = value[1:]
    _check_shape(fields, _FRAME_SHAPES[ftype], ftype)
    return ftype, fields


class FrameDecoder:
    """Sans-IO: feed bytes, get whole frames; raises MessageError on a bad stream."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[FrameType, list]]:
        # Usually a read holds whole frames and nothing is buffered: parse `data` as is.
        buf: bytes | bytearray = data
        if self._buf:
            self._buf += data
            buf = self._buf
        frames = []
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            (length,) = _LEN.unpack_from(buf, pos)
            if length > MAX_FRAME or length == 0:
                raise MessageError(f"frame length {length} out of range")
            if end - pos - 4 < length:
                break
            frames.append(decode_frame_body(buf[pos + 4 : pos + 4 + length]))
            pos += 4 + length
        if buf is data:
            if pos < end:
                self._buf = bytearray(data[pos:])
        elif pos:
            del self._buf[:pos]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame (a truncated stream if the peer closed now)."""
        return len(self._buf)


# --------------------------------------------------------------------- DLM messages


class MsgType(enum.IntEnum):
    # normal lock traffic (saved while the lockspace is stopped)
    REQUEST = 1
    CONVERT = 2
    UNLOCK = 3
    CANCEL = 4
    CAST = 5
    BAST = 6
    LOOKUP = 7
    LOOKUP_REPLY = 8
    # recovery traffic (processed while stopped, tagged with the view epoch)
    BARRIER = 20
    DIR_NAMES = 21
    RLOOKUP = 22
    RLOOKUP_REPLY = 23
    RLOCKS = 24


RECOVERY_TYPES = frozenset(
    {MsgType.BARRIER, MsgType.DIR_NAMES, MsgType.RLOOKUP, MsgType.RLOOKUP_REPLY, MsgType.RLOCKS}
)
DIRECTORY_TYPES = frozenset({MsgType.LOOKUP, MsgType.LOOKUP_REPLY})


class _OptBytes:
    """Marker: bytes or nil."""


_NAME = bytes
_SCHEMAS: dict[MsgType, tuple[tuple[str, type], ...]] = {
    MsgType.REQUEST: (
        ("name", _NAME), ("lkid", int), ("mode", int), ("flags", int),
        ("wants_bast", bool), ("lvb", _OptBytes),
    ),
    MsgType.CONVERT: (
        ("name", _NAME), ("lkid", int), ("mode", int), ("flags", int), ("wants_bast", bool),
        ("lvb", _OptBytes),
    ),
    MsgType.UNLOCK: (("name", _NAME), ("lkid", int), ("flags", int), ("lvb", _OptBytes)),
    MsgType.CANCEL: (("name", _NAME), ("lkid", int)),
    MsgType.CAST: (
        ("name", _NAME), ("lkid", int), ("status", int), ("mode", int), ("sbflags", int),
        ("lvb", _OptBytes), ("lvbseq", int),
    ),
    MsgType.BAST: (("name", _NAME), ("lkid", int), ("mode", int)),
    MsgType.LOOKUP: (("name", _NAME),),
    MsgType.LOOKUP_REPLY: (("name", _NAME), ("master", int)),
    MsgType.BARRIER: (("step", int), ("data", list)),
    MsgType.DIR_NAMES: (("names", list),),
    MsgType.RLOOKUP: (("name", _NAME),),
    MsgType.RLOOKUP_REPLY: (("name", _NAME), ("master", int)),
    MsgType.RLOCKS: (("name", _NAME), ("locks", list)),
}  # fmt: skip
_FIELD_NAMES = {t: tuple(f for f, _ in s) for t, s in _SCHEMAS.items()}
_MSG_TYPES = {int(t): t for t in MsgType}
_SHAPES = {t: tuple(k for _, k in s) for t, s in _SCHEMAS.items()}
#: One rebuilt lock in RLOCKS: lkid, grmode, rqmode, flags, wants_bast, lvb, lvbseq.
RLOCK_SHAPE: tuple[type, ...] = (int, int, int, int, bool, _OptBytes, int)

_HEADER = 6  # version, type, lockspace, from_node, incarnation, epoch


class Message:
    """A decoded DLM message: common header plus type-specific fields (also readable
    as attributes: `msg.name`, `msg.lkid`...)."""

    __slots__ = ("type", "lockspace", "from_node", "incarnation", "epoch", "fields")

    def __init__(
        self, mtype: MsgType, lockspace: bytes, from_node: int, incarnation: int, epoch: int,
        fields: dict[str, Any],
    ) -> None:  # fmt: skip
        self.type = mtype
        self.lockspace = lockspace
        self.from_node = from_node
        self.incarnation = incarnation
        self.epoch = epoch
        self.fields = fields

    def __repr__(self) -> str:
        return f"<{self.type.name} from node {self.from_node} epoch {self.epoch} {self.fields}>"

    def __getattr__(self, item: str) -> Any:
        try:
            return self.fields[item]
        except KeyError:
            raise AttributeError(item) from None


def encode_message(
    mtype: MsgType, lockspace: bytes, from_node: int, incarnation: int, epoch: int, *values: Any
) -> bytes:
    """Encode a message; `values` in the order of the type's schema."""
    return msgpack.packb(
        [PROTO_VERSION, int(mtype), lockspace, from_node, incarnation, epoch, *values],
        use_bin_type=True,
    )


def decode_message(payload: bytes) -> Message:
    """Decode and validate one encoded message; raises MessageError."""
    try:
        value = msgpack.unpackb(payload, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:
        raise MessageError(f"undecodable message: {exc.__class__.__name__}") from None
    return message_from_value(value)


def message_from_value(value: Any) -> Message:
    """Validate an unpacked message (as carried inside a DATA frame); raises MessageError."""
    if type(value) is not list or len(value) < _HEADER:
        raise MessageError("message is not an array with a header")
    version, raw_type, lockspace, from_node, incarnation, epoch = value[:_HEADER]
    if version != PROTO_VERSION or type(version) is not int:
        raise MessageError(f"protocol version {version!r} not supported")
    mtype = _MSG_TYPES.get(raw_type) if type(raw_type) is int else None
    if mtype is None:
        raise MessageError(f"unknown message type {raw_type!r}")
    if not (
        type(lockspace) is bytes
        and type(from_node) is int
        and type(incarnation) is int
        and type(epoch) is int
    ):
        raise MessageError("header fields of the wrong type")
    body = value[_HEADER:]
    _check_shape(body, _SHAPES[mtype], mtype)
    fields = dict(zip(_FIELD_NAMES[mtype], body, strict=True))
    name = fields.get("name")
    if name is not None and not 0 < len(name) <= 64:
        raise MessageError(f"{mtype.name}: resource name of {len(name)} bytes")
    lvb = fields.get("lvb")
    if lvb is not None and len(lvb) != 32:
        raise MessageError(f"{mtype.name}: LVB of {len(lvb)} bytes")
    for key in ("mode",):
        if key in fields and not -1 <= fields[key] <= 5:
            raise MessageError(f"{mtype.name}: mode {fields[key]} out of range")
    if mtype is MsgType.BARRIER and any(type(v) is not int for v in fields["data"]):
        raise MessageError("BARRIER: data must be integers")
    if mtype is MsgType.DIR_NAMES:
        for n in fields["names"]:
            if type(n) is not bytes or not 0 < len(n) <= 64:
                raise MessageError("DIR_NAMES: bad resource name")
    if mtype is MsgType.RLOCKS:
        for row in fields["locks"]:
            if type(row) is not list:
                raise MessageError("RLOCKS: lock row is not an array")
            _check_shape(row, RLOCK_SHAPE, "RLOCKS row")
            if not (-1 <= row[1] <= 5 and -1 <= row[2] <= 5):
                raise MessageError("RLOCKS: mode out of range")
    return Message(mtype, lockspace, from_node, incarnation, epoch, fields)
