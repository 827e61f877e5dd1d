"""The local admin endpoint's framing: 4-byte big-endian length, then one msgpack map.

Shared by the daemon (trio, server side) and by `gfspy status`/`lockdump`/`fence-ack`
(plain blocking sockets: a one-shot command gains nothing from an event loop). Requests
are `{"op": NAME, ...}`; answers always carry `"ok"` and, on failure, `"error"`.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import msgpack

MAX_FRAME = 8 << 20  # a lockdump of a busy lockspace can be large, but not unbounded
_LEN = struct.Struct(">I")


class AdminWireError(Exception):
    """Not an admin frame, or the daemon could not be reached."""


def encode(message: dict[str, Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True, default=_default)
    if len(body) > MAX_FRAME:
        raise AdminWireError(f"admin frame of {len(body)} bytes is too big")
    return _LEN.pack(len(body)) + body


def _default(obj: Any) -> Any:
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    return str(obj)


class Decoder:
    """Accumulate bytes, hand out whole messages (sans-IO)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next(self) -> dict[str, Any] | None:
        if len(self._buf) < _LEN.size:
            return None
        (length,) = _LEN.unpack_from(self._buf)
        if length > MAX_FRAME:
            raise AdminWireError(f"admin frame of {length} bytes is too big")
        if len(self._buf) < _LEN.size + length:
            return None
        body = bytes(self._buf[_LEN.size : _LEN.size + length])
        del self._buf[: _LEN.size + length]
        try:
            message = msgpack.unpackb(body, raw=False, strict_map_key=False)
        except Exception as exc:  # msgpack raises several unrelated types for garbage
            raise AdminWireError(f"undecodable admin frame: {exc}") from None
        if not isinstance(message, dict):
            raise AdminWireError("admin frame is not a map")
        return message


def call(path: str, op: str, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
    """One blocking request/answer on the daemon's Unix socket."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(encode({"op": op, **args}))
            decoder = Decoder()
            while (answer := decoder.next()) is None:
                data = sock.recv(65536)
                if not data:
                    raise AdminWireError(f"{path}: daemon closed the connection")
                decoder.feed(data)
            return answer
    except FileNotFoundError:
        raise AdminWireError(f"{path}: no daemon socket (is the node daemon running?)") from None
    except ConnectionRefusedError:
        raise AdminWireError(f"{path}: connection refused (daemon not running?)") from None
    except TimeoutError:
        raise AdminWireError(f"{path}: no answer within {timeout:g}s") from None
    except OSError as exc:
        raise AdminWireError(f"{path}: {exc.strerror or exc}") from None
