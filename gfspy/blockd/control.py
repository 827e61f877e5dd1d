"""The control channel: ADMIT, FENCE, UNFENCE, SESSION_FENCE and STATUS over TCP.

It sits beside NBD on its own port because NBD has no fencing vocabulary.  Requests are
validated here and carried out by `BlockServer`; a malformed request gets an ERROR answer
and a malformed frame closes that connection, neither touches the server.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from typing import Any

import trio

from gfspy.blockd.control_wire import (
    STATUS_ERROR,
    ControlProtocolError,
    FrameDecoder,
    encode_frame,
)
from gfspy.blockd.server import BlockServer
from gfspy.blockd.tls import common_name

log = logging.getLogger(__name__)


class BadRequest(Exception):
    """A control request with missing or mistyped arguments."""


def _node(req: dict) -> str:
    node = req.get("node")
    if not isinstance(node, str) or not node:
        raise BadRequest("'node' must be a non-empty string")
    return node


def _epoch(req: dict) -> int:
    epoch = req.get("epoch", 0)
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise BadRequest("'epoch' must be a non-negative integer")
    return epoch


def _incarnation(req: dict, *, required: bool) -> int | None:
    """An incarnation as an integer or a hex string; None means all (FENCE only)."""
    value = req.get("incarnation")
    if value is None or value == "all":
        if required:
            raise BadRequest("'incarnation' is required")
        return None
    if isinstance(value, str):
        try:
            value = int(value, 16)
        except ValueError:
            raise BadRequest("'incarnation' string must be hexadecimal") from None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 64:
        raise BadRequest("'incarnation' must be a 64-bit unsigned integer")
    return value


async def dispatch(server: BlockServer, req: dict) -> dict[str, Any]:
    """Carry out one control request and build its answer."""
    op = req.get("op")
    try:
        if op == "STATUS":
            return server.status()
        if op == "FENCE":
            return await server.fence(_node(req), _incarnation(req, required=False), _epoch(req))
        if op == "ADMIT":
            return await server.admit(_node(req), _incarnation(req, required=True), _epoch(req))
        if op == "UNFENCE":
            epoch = None if req.get("epoch") is None else _epoch(req)
            return await server.unfence(_node(req), epoch)
        if op == "SESSION_FENCE":
            session_id = req.get("session_id")
            if not isinstance(session_id, str) or not session_id:
                raise BadRequest("'session_id' must be a non-empty string")
            return await server.session_fence(session_id)
    except BadRequest as e:
        return {"status": STATUS_ERROR, "reason": f"{op}: {e}"}
    return {"status": STATUS_ERROR, "reason": f"unknown op {op!r}"}


TLS_HANDSHAKE_TIMEOUT = 30.0


async def _authenticate(
    stream: trio.SocketStream, peer: str, context: ssl.SSLContext, admins: frozenset[str]
) -> trio.SSLStream | None:
    """TLS with a client certificate whose CN is an administrator, else None."""
    tls = trio.SSLStream(stream, context, server_side=True)
    try:
        with trio.fail_after(TLS_HANDSHAKE_TIMEOUT):
            await tls.do_handshake()
    except (trio.BrokenResourceError, trio.TooSlowError, ssl.SSLError) as e:
        log.warning("control %s: TLS handshake failed: %r", peer, e.__cause__ or e)
        return None
    name = common_name(tls.getpeercert())
    if name not in admins:
        log.warning("control %s: certificate CN %s is not an administrator; closing", peer, name)
        return None
    return tls


async def handle_control(
    server: BlockServer,
    stream: trio.SocketStream,
    *,
    tls_context: ssl.SSLContext | None = None,
    admins: frozenset[str] = frozenset(),
) -> None:
    """Serve request/response frames on one control connection until it closes.

    With `tls_context`, the peer must present a certificate whose CN is in `admins`.
    """
    try:
        peer = "{}:{}".format(*stream.socket.getpeername()[:2])
    except OSError:
        peer = "?"
    decoder = FrameDecoder()
    channel: trio.abc.Stream = stream
    if tls_context is not None:
        authenticated = await _authenticate(stream, peer, tls_context, admins)
        if authenticated is None:
            with contextlib.suppress(trio.BrokenResourceError, OSError):
                await stream.aclose()
            return
        channel = authenticated
    try:
        async with channel:
            while True:
                try:
                    request = decoder.next_frame()
                except ControlProtocolError as e:
                    log.warning("control %s: %s; closing", peer, e)
                    return
                if request is None:
                    data = await channel.receive_some(65536)
                    if not data:
                        if decoder.pending:
                            log.warning("control %s: truncated frame at close", peer)
                        return
                    decoder.receive_data(data)
                    continue
                # STATUS is polled by cluster daemons: keep it out of the INFO log.
                level = logging.DEBUG if request.get("op") == "STATUS" else logging.INFO
                log.log(level, "control %s: %s", peer, request)
                answer = await dispatch(server, request)
                await channel.send_all(encode_frame(answer))
    except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError, ssl.SSLError) as e:
        log.info("control %s: connection lost: %s", peer, e)
    except Exception:
        log.exception("control %s: internal error; connection dropped", peer)
