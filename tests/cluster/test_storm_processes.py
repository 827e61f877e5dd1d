"""A lock storm across four node daemon processes, checked by an outside observer.

Every node process serves lock/convert/unlock through its admin socket; this test process
drives several workers per node at once over persistent admin connections, all on a small
shared set of names, and checks that no two incompatible grants ever coexist.
"""

from __future__ import annotations

import random
import struct
from typing import Any

import pytest
import trio

from gfspy.cluster import admin_wire

from .harness import Cluster

#: The compatibility matrix of the reference (section 1), written out here independently
#: of gfspy.dlm.modes so that the check does not trust the code under test.
MODES = ("NL", "CR", "CW", "PR", "PW", "EX")
COMPATIBLE = {
    "NL": {"NL", "CR", "CW", "PR", "PW", "EX"},
    "CR": {"NL", "CR", "CW", "PR", "PW"},
    "CW": {"NL", "CR", "CW"},
    "PR": {"NL", "CR", "PR"},
    "PW": {"NL", "CR"},
    "EX": {"NL"},
}
WRITERS = ("PW", "EX")  # the modes that may write the value block
COUNTER = struct.Struct(">Q")  # the LVB's first 8 bytes: how many writer holds so far


class AdminConnection:
    """One persistent admin connection to a node daemon (requests answered in order)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = admin_wire.Decoder()

    @classmethod
    async def open(cls, path: str) -> AdminConnection:
        return cls(await trio.open_unix_socket(path))

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        await self.stream.send_all(admin_wire.encode({"op": op, **args}))
        while (answer := self.decoder.next()) is None:
            data = await self.stream.receive_some(65536)
            if not data:
                raise admin_wire.AdminWireError("daemon closed the admin connection")
            self.decoder.feed(data)
        return answer

    async def aclose(self) -> None:
        await self.stream.aclose()


class Observer:
    """What the workers have reported as held, checked against the matrix on every grant.

    A worker reports a grant only after the daemon has answered "granted", and withdraws
    it before it sends the request that gives the mode up: the observed interval lies
    inside the real one, so an observed conflict is a real conflict (no false alarms)."""

    def __init__(self) -> None:
        self.held: dict[str, dict[tuple[int, int], str]] = {}
        self.grants = 0
        self.refused = 0  # NOQUEUE requests turned down because of a conflict
        self.max_concurrent = 0
        self.writer_reads: dict[str, list[int]] = {}
        self.writer_holds: dict[str, int] = {}

    def granted(self, name: str, who: tuple[int, int], mode: str, lvb: bytes | None) -> int:
        holders = self.held.setdefault(name, {})
        for other, other_mode in holders.items():
            assert other_mode in COMPATIBLE[mode], (
                f"{name}: {who} granted {mode} while {other} holds {other_mode}"
            )
        holders[who] = mode
        self.grants += 1
        self.max_concurrent = max(self.max_concurrent, len(holders))
        if mode not in WRITERS:
            return 0
        assert lvb is not None and len(lvb) == 32, f"{name}: writer got no value block"
        (count,) = COUNTER.unpack_from(lvb)
        self.writer_reads.setdefault(name, []).append(count)
        self.writer_holds[name] = self.writer_holds.get(name, 0) + 1
        return count

    def releasing(self, name: str, who: tuple[int, int]) -> None:
        del self.held[name][who]


async def worker(
    conn: AdminConnection,
    who: tuple[int, int],
    names: list[str],
    rounds: int,
    observer: Observer,
    rng: random.Random,
) -> None:
    """Hold-and-release cycles: half as a plain lock/unlock, half as NL -> convert up ->
    convert down -> unlock, which exercises the convert queue and in-place conversion."""
    for _ in range(rounds):
        name = rng.choice(names)
        mode = rng.choice(MODES[1:] + WRITERS)  # writers twice as likely: more conflicts
        via_convert = rng.random() < 0.5
        if via_convert:
            base = await conn.call("lock", lockspace="fs1", name=name, mode="NL", valblk=True,
                                   wait=30)  # fmt: skip
            assert base["ok"] and base["mode"] == "NL", base
            got = await conn.call("convert", lockspace="fs1", lkid=base["lkid"], mode=mode,
                                  valblk=True, wait=30)  # fmt: skip
        else:
            noqueue = rng.random() < 0.25  # try-lock: refused at once rather than queued
            got = await conn.call(
                "lock", lockspace="fs1", name=name, mode=mode, valblk=True, noqueue=noqueue,
                wait=30,
            )  # fmt: skip
            if noqueue and got["status"] == "EAGAIN":
                assert got["ok"] and got["mode"] == "IV", got
                observer.refused += 1
                continue
        assert got["ok"] and got["mode"] == mode and got["status"] == "granted", got
        count = observer.granted(name, who, mode, got["lvb"])
        await trio.sleep(rng.random() * 0.004)  # widen the window an overlap would need
        new_lvb = COUNTER.pack(count + 1) + bytes(24) if mode in WRITERS else None
        observer.releasing(name, who)
        if via_convert:
            down = await conn.call("convert", lockspace="fs1", lkid=got["lkid"], mode="NL",
                                   valblk=new_lvb is not None, lvb=new_lvb, wait=30)  # fmt: skip
            assert down["ok"] and down["mode"] == "NL", down
            done = await conn.call("unlock", lockspace="fs1", lkid=got["lkid"], wait=30)
        else:
            done = await conn.call("unlock", lockspace="fs1", lkid=got["lkid"], lvb=new_lvb,
                                   wait=30)  # fmt: skip
        assert done["ok"] and done["gone"], done


async def sample_masters(
    cluster: Cluster, nodes: list[int], names: list[str], done: trio.Event
) -> int:
    """A second, master-side observer: snapshot every node's lock dump during the storm
    and check each granted queue against the matrix. A dump is built in one step of the
    daemon's event loop, so it is an atomic view of that master. Returns the snapshots
    taken in which a storm name had two or more granted locks."""
    conns = {n: await AdminConnection.open(cluster.socket(n)) for n in nodes}
    shared = 0
    try:
        while not done.is_set():
            for node, conn in conns.items():
                dump = await conn.call("lockdump", lockspace="fs1")
                assert dump["ok"], dump
                for res in dump["resources"]:
                    if res["name"] not in names:
                        continue
                    modes = [text.split()[0].split("->")[0] for text in res["granted"]]
                    for i, a in enumerate(modes):
                        for b in modes[i + 1 :]:
                            assert b in COMPATIBLE[a], f"node {node} masters {res}"
                    shared += len(modes) >= 2
            await trio.sleep(0.01)
    finally:
        for conn in conns.values():
            await conn.aclose()
    return shared


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path, 4)
    try:
        yield c
    finally:
        c.close()


@pytest.mark.timeout(120)
async def test_lock_storm_no_incompatible_grants_coexist(cluster):
    """Four node processes, three workers each, 4 shared names, random modes and paths.

    Two checks make overlap detectable:

    1. The observer (this process) is told of every grant after the daemon granted it
       and of every release before the daemon is asked to give the mode up, so each
       observed hold lies inside the real one; the matrix check on every grant therefore
       never raises a false alarm, and catches any overlap wider than the round trip.
    2. Every node's lock dump is sampled throughout (each dump is an atomic snapshot of
       what that node masters) and each granted queue is checked against the matrix.
    3. For writers (PW, EX) the value block is a counter: the holder reads it on grant
       and writes count+1 when it gives the mode up. Two writer holds that overlapped at
       all would read the same value (neither had written yet), so every writer read must
       be distinct, and the final value must equal the number of writer holds (no lost
       update). That catches writer-writer overlap however brief.
    """
    cluster.start_all()
    await trio.to_thread.run_sync(cluster.wait_view, [1, 2, 3, 4], [1, 2, 3, 4])
    names = [f"storm-{i}" for i in range(4)]
    observer = Observer()
    conns: list[AdminConnection] = []
    storm_over = trio.Event()
    shared_snapshots: list[int] = []

    async def sampler() -> None:
        shared_snapshots.append(await sample_masters(cluster, [1, 2, 3, 4], names, storm_over))

    try:
        async with trio.open_nursery() as outer:
            outer.start_soon(sampler)
            async with trio.open_nursery() as nursery:
                for node in (1, 2, 3, 4):
                    for slot in range(3):
                        conn = await AdminConnection.open(cluster.socket(node))
                        conns.append(conn)
                        rng = random.Random(node * 100 + slot)
                        nursery.start_soon(worker, conn, (node, slot), names, 80, observer, rng)
            storm_over.set()
    finally:
        for conn in conns:
            await conn.aclose()
    assert shared_snapshots[0] > 0  # the master-side observer saw shared grants too

    assert observer.grants + observer.refused == 12 * 80
    assert observer.refused > 0  # NOQUEUE met real conflicts
    assert observer.max_concurrent >= 2  # the storm did share names, not take turns
    final = {}
    for name in names:
        reads = observer.writer_reads.get(name, [])
        assert len(reads) == len(set(reads)), f"{name}: two writer holds read the same counter"
        got = cluster.call(1, "lock", lockspace="fs1", name=name, mode="PR", valblk=True, wait=10)
        assert got["mode"] == "PR" and not got["valnotvalid"], got
        final[name] = COUNTER.unpack_from(got["lvb"])[0]
    assert final == {n: observer.writer_holds.get(n, 0) for n in names}
    assert sum(final.values()) > 50  # writers really did contend on every run
    for node in (1, 2, 3, 4):
        assert cluster.procs[node].poll() is None, cluster.diagnose()
