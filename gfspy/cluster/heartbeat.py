"""Failure detection on its own UDP socket, apart from the DLM's TCP connections.

Why a separate datagram socket: a heartbeat queued behind megabytes of lock traffic makes
a busy node look dead (the commonest cause of false fencing, reference §6.2). A datagram
is never queued behind another connection's bytes, and a lost one only costs one interval.

The core (`FailureDetector`, `encode_packet`, `decode_packet`) is sans-IO: packets and
times in, events out. `HeartbeatSocket` is the thin trio layer. Membership messages ride
on the same socket so that a node that can heartbeat can also take part in view changes,
and one that cannot is treated consistently as gone.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import trio

from gfspy.cluster.config import split_host_port

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
MAX_DATAGRAM = 60000
TAG_LEN = 32  # HMAC-SHA256


@dataclass(frozen=True)
class Packet:
    """One datagram: who sent it (node id + incarnation) and what kind of message."""

    cluster: str
    sender: int
    incarnation: int
    kind: str  # "hb" (heartbeat with gossip) or a membership message kind
    body: dict[str, Any] = field(default_factory=dict)


def encode_packet(packet: Packet, key: bytes | None = None) -> bytes:
    """msgpack, then (with a cluster key) an HMAC-SHA256 tag over it."""
    data = msgpack.packb(
        [
            PROTOCOL_VERSION,
            packet.cluster,
            packet.sender,
            packet.incarnation,
            packet.kind,
            packet.body,
        ],
        use_bin_type=True,
    )
    if len(data) > MAX_DATAGRAM:
        raise ValueError(f"heartbeat packet of {len(data)} bytes is too large")
    if key is not None:
        data += hmac.new(key, data, hashlib.sha256).digest()
    return data


def decode_packet(data: bytes, key: bytes | None = None) -> Packet | None:
    """Decode a datagram; None for anything malformed or, with a key, not authentic.

    A stray packet must not crash us; a forged one must not fence-confirm or expel.
    """
    if key is not None:
        data, tag = data[:-TAG_LEN], data[-TAG_LEN:]
        if not hmac.compare_digest(tag, hmac.new(key, data, hashlib.sha256).digest()):
            return None
    try:
        fields = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:  # msgpack raises several unrelated types for garbage
        return None
    if not isinstance(fields, list) or len(fields) != 6 or fields[0] != PROTOCOL_VERSION:
        return None
    _, cluster, sender, incarnation, kind, body = fields
    if not (
        isinstance(cluster, str)
        and isinstance(sender, int)
        and isinstance(incarnation, int)
        and isinstance(kind, str)
        and isinstance(body, dict)
    ):
        return None
    return Packet(cluster, sender, incarnation, kind, body)


# Events produced by the failure detector.
@dataclass(frozen=True)
class PeerAlive:
    node_id: int
    incarnation: int


@dataclass(frozen=True)
class PeerLate:
    """Silent for longer than the warning threshold: logged well before the failure."""

    node_id: int
    silent_for: float


@dataclass(frozen=True)
class PeerFailed:
    node_id: int
    incarnation: int
    silent_for: float


@dataclass(frozen=True)
class PeerRestarted:
    """Heard with a new incarnation: the old one is dead even if we never timed it out."""

    node_id: int
    old_incarnation: int
    new_incarnation: int


HeartbeatEvent = PeerAlive | PeerLate | PeerFailed | PeerRestarted


@dataclass
class _PeerState:
    incarnation: int
    last_heard: float
    warned: bool = False


class FailureDetector:
    """Declares a peer failed after `timeout` seconds without a packet from it."""

    def __init__(self, my_id: int, timeout: float, warn_fraction: float = 0.75) -> None:
        self.my_id = my_id
        self.timeout = timeout
        self.warn_after = timeout * warn_fraction
        self._peers: dict[int, _PeerState] = {}

    def heard(self, node_id: int, incarnation: int, now: float) -> list[HeartbeatEvent]:
        if node_id == self.my_id:
            return []
        state = self._peers.get(node_id)
        if state is None:
            self._peers[node_id] = _PeerState(incarnation, now)
            return [PeerAlive(node_id, incarnation)]
        if state.incarnation != incarnation:
            old = state.incarnation
            self._peers[node_id] = _PeerState(incarnation, now)
            return [PeerRestarted(node_id, old, incarnation), PeerAlive(node_id, incarnation)]
        state.last_heard = now
        state.warned = False
        return []

    def check(self, now: float) -> list[HeartbeatEvent]:
        events: list[HeartbeatEvent] = []
        for node_id, state in list(self._peers.items()):
            silent = now - state.last_heard
            if silent >= self.timeout:
                del self._peers[node_id]
                events.append(PeerFailed(node_id, state.incarnation, silent))
            elif silent >= self.warn_after and not state.warned:
                state.warned = True
                events.append(PeerLate(node_id, silent))
        return events

    def alive(self) -> dict[int, int]:
        """Peers currently believed alive: node id -> incarnation."""
        return {n: s.incarnation for n, s in self._peers.items()}


class HeartbeatSocket:
    """The UDP socket: send a packet to a node's heartbeat address, receive packets."""

    def __init__(
        self,
        cluster: str,
        my_id: int,
        incarnation: int,
        bind: str,
        peers: dict[int, str],
        key: bytes | None = None,
    ) -> None:
        self.cluster = cluster
        self.key = key
        self.rejected = 0  # datagrams dropped as malformed or not authentic
        self.my_id = my_id
        self.incarnation = incarnation
        self._bind = split_host_port(bind, 0, f"node {my_id}: heartbeat")
        self._peers = {n: split_host_port(a, 0, f"node {n}: heartbeat") for n, a in peers.items()}
        self._sock: trio.socket.SocketType | None = None
        self.send_errors = 0

    async def open(self) -> None:
        family = socket.AF_INET6 if ":" in self._bind[0] else socket.AF_INET
        sock = trio.socket.socket(family, socket.SOCK_DGRAM)
        # No SO_REUSEADDR: a second daemon for the same node must fail here, loudly,
        # rather than share the address and split the node's identity in two.
        try:
            await sock.bind(self._bind)
        except OSError:
            sock.close()
            raise
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def send(self, node_id: int, kind: str, body: dict[str, Any]) -> None:
        if self._sock is None or node_id not in self._peers:
            return
        data = encode_packet(
            Packet(self.cluster, self.my_id, self.incarnation, kind, body), self.key
        )
        try:
            await self._sock.sendto(data, self._peers[node_id])
        except OSError as exc:
            # Unreachable peers (a pulled cable, a dead namespace) are what we detect;
            # the failure detector will notice the silence, so only count it here.
            self.send_errors += 1
            log.debug("node %d: heartbeat to node %d failed: %s", self.my_id, node_id, exc)

    async def receive_forever(self, handle: Callable[[Packet], Awaitable[None] | None]) -> None:
        assert self._sock is not None
        while True:
            data, addr = await self._sock.recvfrom(MAX_DATAGRAM + 1024)
            packet = decode_packet(data, self.key)
            if packet is None:
                self.rejected += 1
                if self.rejected in (1, 10, 100) or self.rejected % 1000 == 0:
                    log.warning("node %d: dropped %d bad or unauthenticated heartbeat "
                                "datagram(s), the latest from %s", self.my_id, self.rejected,
                                addr)  # fmt: skip
                continue
            if packet.cluster != self.cluster or packet.sender == self.my_id:
                continue
            result = handle(packet)
            if result is not None:
                await result
