"""A small in-process cluster for DLM tests: real transports on real loopback TCP.

Every node gets its own 127.0.0.x address and a kernel-chosen port. The membership
layer is played by the test: it calls stop()/start(view) the way gfspy.cluster does
(stop everywhere first, then start with the new view), and "kills" a node by closing
its transport, which drops its sockets just as a crashed process would.
"""

from __future__ import annotations

import os
import random

import trio

from gfspy.cluster.view import Member, View
from gfspy.dlm.lockspace import Lockspace
from gfspy.dlm.transport import Transport


class LoopbackCluster:
    def __init__(self, nursery: trio.Nursery, name: bytes = b"fs") -> None:
        self.nursery = nursery
        self.name = name
        self.transports: dict[int, Transport] = {}
        self.spaces: dict[int, Lockspace] = {}
        self.view: View | None = None
        # Spread test runs over 127.0.0.0/8 so concurrent runs do not share addresses.
        self._base = 2 + (os.getpid() % 200)

    async def add_nodes(self, *node_ids: int) -> None:
        for node_id in node_ids:
            transport = Transport(node_id, random.getrandbits(48), f"127.0.{node_id}.{self._base}")
            await transport.start(self.nursery)
            self.transports[node_id] = transport
            self.spaces[node_id] = Lockspace(self.name, transport)

    def make_view(self, removed: frozenset[int] = frozenset()) -> View:
        epoch = self.view.epoch + 1 if self.view else 1
        members = tuple(
            Member(n, t.incarnation, t.address) for n, t in sorted(self.transports.items())
        )
        return View(epoch, members, True, removed)

    async def change_view(self, removed: frozenset[int] = frozenset()) -> None:
        """What the cluster layer does: stop every live node, then start the new view."""
        view = self.make_view(removed)
        for ls in self.spaces.values():
            await ls.stop()
        self.view = view
        results = []

        async def start(ls: Lockspace) -> None:
            results.append(await ls.start(view))

        async with trio.open_nursery() as nursery:
            for ls in self.spaces.values():
                nursery.start_soon(start, ls)
        assert all(results)

    async def kill(self, node_id: int) -> None:
        """Crash a node: its sockets close and its lock state is simply lost."""
        await self.transports.pop(node_id).aclose()
        self.spaces.pop(node_id)

    async def close(self) -> None:
        for transport in self.transports.values():
            await transport.aclose()

    def masters_of(self, name: bytes) -> list[int]:
        return [n for n, ls in self.spaces.items() if name in ls.masters and ls.masters[name].locks]


async def eventually(predicate, timeout: float = 10.0) -> None:
    """Wait until `predicate()` holds; fails the test after `timeout` seconds (a hang
    guard for a loaded machine, not a time the test asserts)."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)
