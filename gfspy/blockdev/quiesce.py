"""The quiesce guarantee of reference §3.7 rule 3: proof that a broken session is drained.

A write sent on a session that broke before its reply may still be executed by the old
server later. It may be reissued elsewhere only once that cannot happen any more:

* SESSION_FENCE of the old session through the server's control channel is CONFIRMED
  (gfspy-blockd confirms only after that session's backend I/O returned, and confirms
  a session it no longer has, which it drops only after its I/O returned); or
* the server is confirmed gone: its control port (or, for a server without a control
  channel, its NBD port) actively refuses connections; or
* the cluster manager confirms it fenced the *server* (power, or SCSI-3 PR preempt and
  abort): asked through the optional `fence_server` hook once the control channel has
  failed to answer; or
* only when configured, a declared upper bound on a request's lifetime in the server
  has passed since the failure.
"""

from __future__ import annotations

import errno
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from gfspy.blockd import control_client
from gfspy.blockd.address import parse_hostport

if TYPE_CHECKING:
    from gfspy.blockdev.nbd_session import NbdTarget

log = logging.getLogger(__name__)

#: Asks the cluster manager to fence a whole server (by address); True once confirmed.
FenceServerHook = Callable[[str], Awaitable[bool]]


async def obtain_quiesce_guarantee(
    target: NbdTarget,
    session_id: str | None,
    local_address: tuple[str, int] | None,
    *,
    timeout: float,
    retry_interval: float,
    control_tls: ssl.SSLContext | None = None,
    lifetime_bound: float | None,
    is_fenced: Callable[[], bool],
    fence_server: FenceServerHook | None = None,
    control_timeout: float = 5.0,
) -> str | None:
    """Return how the old session is known drained, or None if that cannot be shown."""
    start = trio.current_time()
    pause = min(0.05, retry_interval)  # a dying server refuses within moments: retry soon
    escalated = False
    while trio.current_time() - start < timeout and not is_fenced():
        remaining = timeout - (trio.current_time() - start)
        how = await _try_quiesce(
            target, session_id, local_address, min(remaining, control_timeout), control_tls
        )
        if how is not None:
            return how
        if fence_server is not None and not escalated:
            escalated = True  # ask once; the cluster manager retries and escalates itself
            log.warning(
                "%s: session not confirmed drained; asking to fence the server", target.server
            )
            try:
                if await fence_server(target.server):
                    return "server fenced by the cluster manager"
            except Exception:
                log.exception("%s: fence_server hook failed", target.server)
        if lifetime_bound is not None and trio.current_time() - start >= lifetime_bound:
            return f"declared request lifetime bound of {lifetime_bound:g}s passed"
        await trio.sleep(pause)
        pause = min(pause * 2, retry_interval)
    return None


async def _try_quiesce(
    target: NbdTarget,
    session_id: str | None,
    local_address: tuple[str, int] | None,
    timeout: float,
    control_tls: ssl.SSLContext | None,
) -> str | None:
    if target.control is None:
        # No control channel: only a server that is gone for sure can be trusted.
        if target.host is not None and await connection_refused(target.host, target.port, timeout):
            return "server gone (NBD port refuses connections)"
        return None
    host, port = parse_hostport(target.control)
    if await connection_refused(host, port, timeout):
        return "server gone (control port refuses connections)"
    if session_id is None:
        # The server did not name the session in the handshake: find it by our address.
        try:
            status = await control_client.server_status(
                target.control, timeout=timeout, ssl_context=control_tls
            )
        except control_client.ControlError as e:
            log.warning("%s: control STATUS failed: %s", target.server, e)
            return None
        session_id = _find_session(status, local_address)
        if session_id is None:
            return "server lists no session for our connection (drained and closed)"
    try:
        answer = await control_client.session_fence(
            target.control, session_id, timeout=timeout, ssl_context=control_tls
        )
    except control_client.ControlError as e:
        log.warning("%s: SESSION_FENCE failed: %s", target.server, e)
        return None
    if control_client.is_confirmed(answer):
        return f"SESSION_FENCE of {session_id} confirmed"
    log.warning("%s: SESSION_FENCE of %s not confirmed: %s", target.server, session_id, answer)
    return None


def _find_session(status: dict[str, Any], local_address: tuple[str, int] | None) -> str | None:
    if local_address is None:
        return None
    host, port = local_address[0], local_address[1]
    wanted = {f"{host}:{port}", f"[{host}]:{port}"}
    for session in status.get("sessions", ()):
        if isinstance(session, dict) and session.get("peer") in wanted:
            return str(session.get("session_id"))
    return None


async def connection_refused(host: str, port: int, timeout: float) -> bool:
    """True only when the host actively refuses a TCP connection (nothing listens)."""
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        return False
    except OSError as e:
        return socket_errno(e) == errno.ECONNREFUSED
    await trio.aclose_forcefully(stream)
    return False


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
