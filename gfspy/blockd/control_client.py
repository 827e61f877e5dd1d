"""Async client of gfspy-blockd's control channel (fence, unfence, admit, status).

The cluster manager's `storage` fence method and `gfspy fence` call these.  A FENCE
answer of CONFIRMED means the server drained and cut off the victim; anything else,
including a lost connection, must be treated as "not fenced" and escalated.
"""

from __future__ import annotations

import logging
import ssl

import trio

from gfspy.blockd.address import parse_hostport
from gfspy.blockd.control_wire import (
    STATUS_CONFIRMED,
    ControlProtocolError,
    FrameDecoder,
    encode_frame,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 120.0  # longer than the server's default drain deadline


class ControlError(Exception):
    """The control call did not produce an answer (unreachable, timeout, garbage)."""


async def control_call(
    address: str,
    op: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    ssl_context: ssl.SSLContext | None = None,
    **args: object,
) -> dict:
    """Send one request to the control channel at HOST:PORT and return the response map.

    Raises ControlError when no well-formed answer arrives within `timeout` seconds.
    """
    try:
        host, port = parse_hostport(address)
    except ValueError as e:
        raise ControlError(str(e)) from None
    request = {"op": op, **args}
    try:
        with trio.fail_after(timeout):
            stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
            if ssl_context is not None:
                stream = trio.SSLStream(stream, ssl_context, server_hostname=host)
            async with stream:
                await stream.send_all(encode_frame(request))
                decoder = FrameDecoder()
                while True:
                    frame = decoder.next_frame()
                    if frame is not None:
                        return frame
                    data = await stream.receive_some(65536)
                    if not data:
                        raise ControlError(f"{address}: connection closed before the answer")
                    decoder.receive_data(data)
    except trio.TooSlowError:
        raise ControlError(f"{address}: no answer to {op} within {timeout:g} s") from None
    except (OSError, trio.BrokenResourceError, ssl.SSLError) as e:
        raise ControlError(f"{address}: {e}") from None
    except ControlProtocolError as e:
        raise ControlError(f"{address}: {e}") from None


async def fence_node(
    address: str, node: str, epoch: int, incarnation: int | None = None, **kw: object
) -> dict:
    """FENCE a node (one incarnation, or all when None); CONFIRMED only after the drain."""
    return await control_call(
        address, "FENCE", node=node, incarnation=incarnation, epoch=epoch, **kw
    )


async def unfence_node(address: str, node: str, epoch: int | None = None, **kw: object) -> dict:
    """Lift every ban on a node (manual unfence); epoch None overrides the epoch check."""
    return await control_call(address, "UNFENCE", node=node, epoch=epoch, **kw)


async def admit_node(address: str, node: str, incarnation: int, epoch: int, **kw: object) -> dict:
    """Admit a new incarnation of a node that rejoined the cluster."""
    return await control_call(
        address, "ADMIT", node=node, incarnation=incarnation, epoch=epoch, **kw
    )


async def session_fence(address: str, session_id: str, **kw: object) -> dict:
    """Drain and close one NBD session (the multipath client's quiesce guarantee)."""
    return await control_call(address, "SESSION_FENCE", session_id=session_id, **kw)


async def server_status(address: str, **kw: object) -> dict:
    """Fence table, live sessions and exports of one server."""
    return await control_call(address, "STATUS", **kw)


def is_confirmed(response: dict) -> bool:
    return response.get("status") == STATUS_CONFIRMED
