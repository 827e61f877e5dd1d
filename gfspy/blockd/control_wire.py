"""Framing of the control channel: 4-byte big-endian length, then one msgpack map.

Sans-IO so that the server and the client (and tests) share one decoder.  A request is
``{"op": NAME, ...arguments}``; a response always carries ``"status"``: ``OK``,
``CONFIRMED``, ``FAILED`` (with ``"reason"``) or ``ERROR`` (with ``"reason"``: the
request itself was bad, or contradicts the fence table).

Operations (incarnations are integers, or hexadecimal strings):

- ``FENCE {node, incarnation (None or "all" = every one), epoch}`` -> ``CONFIRMED
  {sessions_closed: [ids]}`` once the ban is on disk and the node's I/O drained and its
  connections closed; ``FAILED {reason}`` otherwise (drain deadline, disk error).
- ``ADMIT {node, incarnation, epoch}`` -> ``OK``; ``ERROR`` for an epoch older than the
  node's last fence, or for an incarnation that was itself fenced.
- ``UNFENCE {node, epoch (optional; absent = operator override)}`` -> ``OK`` | ``ERROR``.
- ``SESSION_FENCE {session_id}`` -> ``CONFIRMED`` | ``FAILED``: the same drain for one
  connection, without a ban (the id is in the export description, ``session=ID``).
- ``STATUS {}`` -> ``OK {server, fence_table, sessions, exports}``.
"""

from __future__ import annotations

import struct

import msgpack

MAX_FRAME = 1 << 20  # a control message is tiny; anything bigger is abuse
_LEN = struct.Struct(">I")

OPS = ("ADMIT", "FENCE", "UNFENCE", "SESSION_FENCE", "STATUS")
STATUS_OK = "OK"
STATUS_CONFIRMED = "CONFIRMED"
STATUS_FAILED = "FAILED"
STATUS_ERROR = "ERROR"


class ControlProtocolError(Exception):
    """The peer sent something that is not a control frame."""


def encode_frame(message: dict) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ControlProtocolError(f"control frame of {len(body)} bytes is too big")
    return _LEN.pack(len(body)) + body


class FrameDecoder:
    """Accumulate bytes; hand out complete decoded frames."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    def next_frame(self) -> dict | None:
        """The next complete message, or None until more bytes arrive."""
        if len(self._buf) < _LEN.size:
            return None
        (length,) = _LEN.unpack_from(self._buf, 0)
        if length > MAX_FRAME:
            raise ControlProtocolError(f"control frame of {length} bytes is too big")
        if len(self._buf) < _LEN.size + length:
            return None
        body = bytes(self._buf[_LEN.size : _LEN.size + length])
        del self._buf[: _LEN.size + length]
        try:
            message = msgpack.unpackb(body, raw=False, strict_map_key=True)
        except Exception as e:  # msgpack raises several unrelated types
            raise ControlProtocolError(f"control frame is not msgpack: {e}") from None
        if not isinstance(message, dict):
            raise ControlProtocolError("control frame is not a map")
        return message

    @property
    def pending(self) -> int:
        """Bytes received but not yet consumed (non-zero at EOF means truncation)."""
        return len(self._buf)
