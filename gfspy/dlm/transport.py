"""Per-peer reliable, ordered message links over TCP (trio), as Linux midcomms does.

The DLM protocol assumes exactly-once, in-order delivery per peer, and TCP alone loses
what was in flight when a connection breaks. So each message to a peer gets a sequence
number and stays queued until the peer acknowledges it; after a reconnect the peer says
which sequence it has seen (HELLO_ACK) and we resend the rest; duplicates are dropped
by sequence number.

Each direction uses its own connection: our messages to peer P travel on the connection
we opened to P (P's acks come back on it), P's messages to us on the one P opened. That
avoids any tie-break between simultaneous connects.

Incoming DLM messages are decoded and handed to the lockspace registered under their
name; undecodable frames, messages whose header contradicts the authenticated peer and
unknown lockspaces are dropped with one log line each. Membership and incarnation checks
belong to the lockspace, which knows the current view.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import socket
from collections.abc import Callable

import trio

from gfspy.dlm.messages import (
    FrameDecoder,
    FrameType,
    Message,
    MessageError,
    encode_data_frame,
    encode_frame,
    message_from_value,
)

log = logging.getLogger(__name__)

Handler = Callable[[Message], None]

ACK_DELAY = 0.02  # coalesce acks; the sender never waits for them
ACK_EVERY = 128  # ...but ack at once after this many messages
RECONNECT_MIN = 0.05
RECONNECT_MAX = 1.0
HELLO_TIMEOUT = 5.0
READ_SIZE = 256 * 1024
MAX_UNACKED = 1_000_000


LINK_ERRORS = (
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    MessageError,
)


def _unwrap_link_error(group: BaseExceptionGroup) -> BaseException:
    """A link's two tasks fail as a group; if every failure is a link error, report the
    first as a plain exception so the reconnect logic sees it."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    if leaves and all(isinstance(e, LINK_ERRORS) for e in leaves):
        return leaves[0]
    return group


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class _Outgoing:
    """Our queue towards one peer: unacknowledged messages by sequence number."""

    def __init__(self, node_id: int, address: str, incarnation: int | None) -> None:
        self.node_id = node_id
        self.address = address
        #: The peer run we talk to; a peer answering with another incarnation is refused.
        self.incarnation = incarnation
        self.next_seq = 1
        self.unacked: collections.deque[tuple[int, bytes]] = collections.deque()
        self.sent_upto = 0  # highest seq written on the current connection
        self.wakeup = trio.Event()
        self.peer_incarnation: int | None = None
        self.cancel_scope: trio.CancelScope | None = None
        self.connected = False
        self.stream: trio.SocketStream | None = None
        #: A plain (non-blocking) handle on the connected socket, so `send` can write at
        #: once when the link is idle instead of waking the sender task: one fewer task
        #: switch per message, which is most of a loopback round trip.
        self.sock: socket.socket | None = None
        self.writing = False  # the sender task is inside send_all
        self.partial = b""  # tail of a frame `send` could only write in part
        self.overflowed = False


class Transport:
    """One node's DLM links: a listener plus one sender task per peer."""

    def __init__(
        self, node_id: int, incarnation: int, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.node_id = node_id
        self.incarnation = incarnation
        self.host = host
        self.port = port
        self._handlers: dict[bytes, Handler] = {}
        self._out: dict[int, _Outgoing] = {}
        #: (node_id, incarnation) -> last sequence delivered from that peer run.
        self._received: dict[tuple[int, int], int] = {}
        self._nursery: trio.Nursery | None = None
        self._listeners: list[trio.SocketListener] = []
        self._scope = trio.CancelScope()
        self._closed = False
        self.dropped = 0  # messages dropped as invalid, for tests and status
        #: A peer that acknowledges nothing while this many messages pile up is treated
        #: as failed: `on_overflow(node_id)` is called once (the cluster layer should
        #: remove it). Messages are never dropped: that would break exactly-once.
        self.max_unacked = MAX_UNACKED
        self.hello_timeout = HELLO_TIMEOUT
        self.on_overflow: Callable[[int], None] | None = None

    # ------------------------------------------------------------------ setup

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self, nursery: trio.Nursery) -> None:
        """Bind the listener (port 0 picks a free port) and run under `nursery`."""
        self._listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = self._listeners[0].socket.getsockname()[1]
        self._scope = trio.CancelScope()
        await nursery.start(self._main)
        log.info("node %d: DLM transport listening on %s", self.node_id, self.address)

    async def _main(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self._scope:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(trio.serve_listeners, self._serve_connection, self._listeners)
                task_status.started()
                await trio.sleep_forever()

    async def aclose(self) -> None:
        """Stop everything: listener, links, queues (a crashed node looks like this)."""
        self._scope.cancel()
        self._closed = True  # tasks not yet reached by the cancel must deliver nothing
        for listener in self._listeners:
            await listener.aclose()
        self._out.clear()

    def register(self, lockspace: bytes, handler: Handler) -> None:
        self._handlers[lockspace] = handler

    def unregister(self, lockspace: bytes) -> None:
        self._handlers.pop(lockspace, None)

    def set_peer(self, node_id: int, address: str, incarnation: int | None = None) -> None:
        """Declare (or update) a peer; its sender task starts at once.

        A different `incarnation` is a different run of the peer: anything queued for
        the old one is discarded with the old link.
        """
        if node_id == self.node_id:
            return
        out = self._out.get(node_id)
        if (
            out is not None
            and incarnation is not None
            and out.incarnation not in (None, incarnation)
        ):
            self.forget(node_id)
            out = None
        if out is None:
            self._out[node_id] = out = _Outgoing(node_id, address, incarnation)
            assert self._nursery is not None, "transport not started"
            out.cancel_scope = trio.CancelScope()
            self._nursery.start_soon(self._sender, out)
        else:
            out.incarnation = incarnation if incarnation is not None else out.incarnation
            if out.address != address:
                out.address = address
                out.wakeup.set()

    def forget(self, node_id: int) -> None:
        """A removed peer: discard its queue (it is fenced; nothing may reach it)."""
        out = self._out.pop(node_id, None)
        if out is not None and out.cancel_scope is not None:
            out.cancel_scope.cancel()
            log.info(
                "node %d: dropped link to node %d (%d unacked)",
                self.node_id,
                node_id,
                len(out.unacked),
            )

    def send(self, node_id: int, payload: bytes) -> None:
        """Queue one message for `node_id`; never blocks. Unknown peers are an error."""
        out = self._out.get(node_id)
        if out is None:
            if not self._closed:
                log.warning("node %d: no link to node %d, message dropped", self.node_id, node_id)
            return
        seq = out.next_seq
        out.next_seq += 1
        out.unacked.append((seq, payload))
        if len(out.unacked) > self.max_unacked and not out.overflowed:
            out.overflowed = True
            log.error("node %d: node %d has %d unacknowledged messages; reporting it failed",
                      self.node_id, node_id, len(out.unacked))  # fmt: skip
            if self.on_overflow is not None:
                self.on_overflow(node_id)
        sock = out.sock
        if sock is not None and not out.writing and not out.partial and out.sent_upto == seq - 1:
            frame = encode_data_frame(seq, payload)
            try:
                written = sock.send(frame)
            except BlockingIOError:
                written = 0
            except OSError:
                written = -1  # the sender task will see the error and reconnect
            if written >= 0:
                out.sent_upto = seq
                if written == len(frame):
                    return
                out.partial = frame[written:]
        out.wakeup.set()

    async def reset_link(self, node_id: int) -> None:
        """Break the current connection to a peer (admin/testing); the link reconnects
        and resends whatever the peer had not acknowledged."""
        out = self._out.get(node_id)
        if out is not None and out.stream is not None:
            await out.stream.aclose()

    def unacked(self, node_id: int) -> int:
        out = self._out.get(node_id)
        return len(out.unacked) if out else 0

    # ------------------------------------------------------------------ sending

    async def _sender(self, out: _Outgoing) -> None:
        delay = RECONNECT_MIN
        assert out.cancel_scope is not None
        with out.cancel_scope:
            while True:
                try:
                    host, port = split_address(out.address)
                    with trio.fail_after(self.hello_timeout):  # a peer that drops SYNs
                        stream = await trio.open_tcp_stream(host, port)
                except (OSError, ValueError, trio.TooSlowError) as exc:
                    log.debug(
                        "node %d: connect to node %d at %s failed: %s",
                        self.node_id,
                        out.node_id,
                        out.address,
                        exc,
                    )
                    await trio.sleep(delay)
                    delay = min(delay * 2, RECONNECT_MAX)
                    continue
                try:
                    async with stream:
                        await self._run_link(out, stream)
                except LINK_ERRORS as exc:
                    log.info("node %d: link to node %d lost: %r", self.node_id, out.node_id, exc)
                if out.connected:
                    delay = RECONNECT_MIN  # it worked for a while: retry promptly
                out.connected = False
                await trio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)

    async def _run_link(self, out: _Outgoing, stream: trio.SocketStream) -> None:
        await stream.send_all(
            encode_frame(FrameType.HELLO, self.node_id, self.incarnation, out.node_id)
        )
        decoder = FrameDecoder()
        with trio.fail_after(self.hello_timeout):
            frames: list = []
            while not frames:
                data = await stream.receive_some(4096)
                if not data:
                    raise trio.BrokenResourceError("closed during handshake")
                frames = decoder.feed(data)
        ftype, (peer_id, peer_inc, last_seen) = frames[0]
        if ftype != FrameType.HELLO_ACK or peer_id != out.node_id:
            raise MessageError(f"bad handshake reply from {out.address}")
        if out.incarnation is not None and peer_inc != out.incarnation:
            raise MessageError(
                f"node {peer_id} at {out.address} runs incarnation {peer_inc}, "
                f"expected {out.incarnation}"
            )
        if out.peer_incarnation is not None and peer_inc != out.peer_incarnation:
            # The peer restarted under us: what we queued was for its previous run.
            log.info("node %d: node %d has a new incarnation, dropping %d queued",
                     self.node_id, peer_id, len(out.unacked))  # fmt: skip
            out.unacked.clear()
            out.next_seq = 1
        out.peer_incarnation = peer_inc
        self._trim(out, last_seen)
        out.sent_upto = last_seen
        out.partial = b""
        out.connected = True
        out.stream = stream
        out.sock = socket.socket(fileno=os.dup(stream.socket.fileno()))
        out.sock.setblocking(False)
        try:
            await self._pump(out, stream, decoder, frames[1:])
        except BaseExceptionGroup as group:
            raise _unwrap_link_error(group) from None
        finally:
            out.sock.close()
            out.sock = None
            out.writing = False

    async def _pump(
        self, out: _Outgoing, stream: trio.SocketStream, decoder: FrameDecoder, early: list
    ) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_acks, out, stream, decoder, early)
            while True:
                if out.partial:
                    data, out.partial = out.partial, b""
                    await self._write(out, stream, data)
                    continue
                first = out.unacked[0][0] if out.unacked else out.next_seq
                start = max(0, out.sent_upto + 1 - first)
                batch = [
                    encode_data_frame(seq, p)
                    for seq, p in itertools.islice(out.unacked, start, None)
                ]
                if batch:
                    out.sent_upto = out.unacked[-1][0]
                    await self._write(out, stream, b"".join(batch))
                    continue
                out.wakeup = trio.Event()
                await out.wakeup.wait()

    @staticmethod
    async def _write(out: _Outgoing, stream: trio.SocketStream, data: bytes) -> None:
        out.writing = True
        try:
            await stream.send_all(data)
        finally:
            out.writing = False

    async def _read_acks(
        self, out: _Outgoing, stream: trio.SocketStream, decoder: FrameDecoder, early: list
    ) -> None:
        frames = early
        while True:
            for ftype, fields in frames:
                if ftype != FrameType.ACK:
                    raise MessageError(f"unexpected {ftype.name} on an outgoing link")
                self._trim(out, fields[0])
            data = await stream.receive_some(READ_SIZE)
            if not data:
                raise trio.BrokenResourceError("peer closed")
            frames = decoder.feed(data)

    @staticmethod
    def _trim(out: _Outgoing, acked: int) -> None:
        while out.unacked and out.unacked[0][0] <= acked:
            out.unacked.popleft()

    # ------------------------------------------------------------------ receiving

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        peer = "?"
        try:
            try:
                async with stream:
                    peer = await self._receive_link(stream)
            except BaseExceptionGroup as group:
                raise _unwrap_link_error(group) from None
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("node %d: incoming link from %s closed: %s", self.node_id, peer, exc)
        except MessageError as exc:
            self.dropped += 1
            log.warning(
                "node %d: protocol error from %s, closing link: %s", self.node_id, peer, exc
            )
        except trio.TooSlowError:
            log.warning("node %d: incoming connection sent no HELLO, closed", self.node_id)

    async def _receive_link(self, stream: trio.SocketStream) -> str:
        sock = stream.socket
        decoder = FrameDecoder()
        frames: list = []
        with trio.fail_after(self.hello_timeout):
            while not frames:
                data = await stream.receive_some(4096)
                if not data:
                    return "?"
                frames = decoder.feed(data)
        ftype, fields = frames[0]
        if ftype != FrameType.HELLO:
            raise MessageError(f"expected HELLO, got {ftype.name}")
        peer_id, peer_inc, wanted = fields
        if wanted != self.node_id:
            raise MessageError(f"HELLO for node {wanted} reached node {self.node_id}")
        key = (peer_id, peer_inc)
        last = self._received.setdefault(key, 0)
        await stream.send_all(
            encode_frame(FrameType.HELLO_ACK, self.node_id, self.incarnation, last)
        )
        peer = f"node {peer_id}"
        ack_needed = trio.Event()
        state = {"unacked": 0}

        async def ack_writer() -> None:
            nonlocal ack_needed
            while True:
                await ack_needed.wait()
                await trio.sleep(ACK_DELAY)
                ack_needed = trio.Event()
                state["unacked"] = 0
                await stream.send_all(encode_frame(FrameType.ACK, self._received[key]))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ack_writer)
            frames = frames[1:]
            while True:
                for ftype, fields in frames:
                    if ftype != FrameType.DATA:
                        raise MessageError(f"unexpected {ftype.name} on an incoming link")
                    seq, payload = fields
                    if seq <= self._received[key]:
                        continue  # duplicate after a reconnect
                    if seq != self._received[key] + 1:
                        raise MessageError(f"sequence gap: got {seq} after {self._received[key]}")
                    self._received[key] = seq
                    state["unacked"] += 1
                    self._deliver(peer_id, peer_inc, payload)
                if state["unacked"]:
                    ack_needed.set()
                try:
                    # The raw trio socket: the stream wrapper's error translation costs
                    # a context manager per read, which shows on a round trip.
                    data = await sock.recv(READ_SIZE)
                except OSError:
                    data = b""  # reset by the peer: same as a close for what we got
                if not data:
                    if decoder.pending:
                        log.warning(
                            "node %d: %s closed mid-frame (%d bytes)",
                            self.node_id,
                            peer,
                            decoder.pending,
                        )
                    nursery.cancel_scope.cancel()
                    return peer
                frames = decoder.feed(data)

    def _deliver(self, peer_id: int, peer_inc: int, payload: object) -> None:
        if self._closed:
            return
        try:
            msg = message_from_value(payload)
        except MessageError as exc:
            self.dropped += 1
            log.warning(
                "node %d: dropped malformed message from node %d: %s", self.node_id, peer_id, exc
            )
            return
        if msg.from_node != peer_id or msg.incarnation != peer_inc:
            self.dropped += 1
            log.warning(
                "node %d: dropped %s claiming node %d/%d on the link of node %d/%d",
                self.node_id, msg.type.name, msg.from_node, msg.incarnation, peer_id, peer_inc,
            )  # fmt: skip
            return
        handler = self._handlers.get(msg.lockspace)
        if handler is None:
            self.dropped += 1
            log.warning(
                "node %d: dropped %s for unknown lockspace %r from node %d",
                self.node_id,
                msg.type.name,
                msg.lockspace,
                peer_id,
            )
            return
        try:
            handler(msg)
        except Exception:
            # A bug or a hostile message must not take the node's links down.
            self.dropped += 1
            log.exception(
                "node %d: handling %s from node %d failed", self.node_id, msg.type.name, peer_id
            )
