"""The trio client against a scripted hostile server on loopback: errors, never hangs.

The "server" here is a few lines of trio that send chosen bytes; it stands in for a
broken or malicious NBD server, which no real server can be made to be on demand.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable

import pytest
import trio

from gfspy.blockdev.device import DeviceError
from gfspy.blockdev.nbd import NbdDevice, PathError
from gfspy.nbd import wire
from gfspy.nbd.wire import Opt, Rep, TransmissionFlag

FLAGS = int(TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH)
Script = Callable[[trio.SocketStream], Awaitable[None]]


async def handshake(stream: trio.SocketStream) -> None:
    """A correct GO handshake for a 1 MiB export."""
    await stream.send_all(wire.encode_greeting())
    buf = b""
    while len(buf) < 4 + 16:
        buf += await stream.receive_some(4096)
    header = wire.decode_option_header(buf[4:20])
    while len(buf) < 20 + header.length:
        buf += await stream.receive_some(4096)
    await stream.send_all(
        wire.encode_option_reply(Opt.GO, Rep.INFO, wire.encode_info_export(1 << 20, FLAGS))
        + wire.encode_option_reply(Opt.GO, Rep.ACK)
    )


async def next_request(stream: trio.SocketStream) -> wire.Request:
    buf = b""
    while len(buf) < wire.REQUEST_HEADER_SIZE:
        buf += await stream.receive_some(wire.REQUEST_HEADER_SIZE - len(buf))
    return wire.decode_request(buf)


async def serve(script: Script, task_status=trio.TASK_STATUS_IGNORED) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])

    async def handler(stream: trio.SocketStream) -> None:
        try:
            await script(stream)
            await trio.sleep(30)  # keep the connection open: the client must not wait
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    await trio.serve_listeners(handler, listeners)


async def garbage_greeting(stream):
    await stream.send_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")


async def close_after_greeting(stream):
    await stream.send_all(wire.encode_greeting())
    await stream.aclose()


async def silent(stream):
    pass


async def unknown_cookie(stream):
    await handshake(stream)
    req = await next_request(stream)
    await stream.send_all(wire.encode_simple_reply(0, req.cookie + 1000))


async def wrong_reply_magic(stream):
    await handshake(stream)
    req = await next_request(stream)
    await stream.send_all(b"\xde\xad\xbe\xef" + wire.encode_simple_reply(0, req.cookie)[4:])


async def truncated_read(stream):
    await handshake(stream)
    req = await next_request(stream)
    await stream.send_all(wire.encode_simple_reply(0, req.cookie) + b"x" * 100)
    await stream.aclose()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("script", [garbage_greeting, close_after_greeting, silent])
async def test_bad_handshakes_fail_open_cleanly(script):
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve, script)
        with pytest.raises(PathError) as e:
            await NbdDevice.open(f"nbd://127.0.0.1:{port}/", connect_timeout=2)
        assert e.value.errno in (errno.EPROTO, errno.ETIMEDOUT)
        nursery.cancel_scope.cancel()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("script", [unknown_cookie, wrong_reply_magic, truncated_read])
async def test_bad_replies_fail_the_request_cleanly(script):
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve, script)
        dev = await NbdDevice.open(f"nbd://127.0.0.1:{port}/", io_timeout=20, connect_timeout=2)
        try:
            with trio.fail_after(5):  # a protocol error is noticed at once, not at io_timeout
                with pytest.raises(DeviceError) as e:
                    await dev.read(0, 4096)
            assert e.value.errno in (errno.EPROTO, errno.ECONNRESET, errno.ECONNREFUSED)
        finally:
            await dev.aclose()
        nursery.cancel_scope.cancel()
