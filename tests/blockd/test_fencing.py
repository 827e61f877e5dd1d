"""FENCE is drain-then-confirm: after CONFIRMED the victim's writes stop landing for good."""

from __future__ import annotations

import json
import os

import pytest
import trio

from gfspy.blockd.control_client import (
    admit_node,
    control_call,
    fence_node,
    server_status,
    session_fence,
    unfence_node,
)
from gfspy.nbd.wire import Cmd, NbdErrno, Rep

from .conftest import make_image
from .harness import RawNbd

CHUNK = 16 * 1024
IMAGE = 16 * 1024 * 1024
SLOTS = IMAGE // CHUNK


class Flood:
    """Pipelined writes of unique random chunks, each slot written at most once."""

    def __init__(self, client: RawNbd, depth: int = 32) -> None:
        self.client = client
        self.depth = depth
        self.payloads: dict[int, bytes] = {}  # cookie -> data (slot = cookie)
        self.acked: list[int] = []
        self.refused: list[int] = []
        self.ended = trio.Event()

    async def run(self) -> None:
        await self.run_range(0, SLOTS)

    async def run_range(self, first: int, end: int) -> None:
        """Write slots first..end-1 until done or the server hangs up."""
        window = trio.Semaphore(self.depth)

        async def sender() -> None:
            for slot in range(first, end):
                await window.acquire()
                data = os.urandom(CHUNK)
                self.payloads[slot] = data
                try:
                    await self.client.send_request(Cmd.WRITE, slot, slot * CHUNK, CHUNK, data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    return

        async def receiver() -> None:
            try:
                while True:
                    cookie, error, _ = await self.client.read_reply({})
                    (self.acked if error == 0 else self.refused).append(cookie)
                    if error not in (0, NbdErrno.EPERM):
                        raise AssertionError(f"unexpected error {error}")
                    window.release()
            except (EOFError, trio.BrokenResourceError, OSError):
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            await receiver()  # returns when the server hangs up
            nursery.cancel_scope.cancel()
        self.ended.set()


async def raw_open(port: int, name: str) -> RawNbd:
    client = await RawNbd.connect(port)
    await client.open(name)
    return client


async def go_refusal(port: int, name: str) -> tuple[int, bytes]:
    client = await RawNbd.connect(port)
    try:
        await client.greet()
        return await client.go(name)
    finally:
        await client.aclose()


@pytest.mark.timeout(90)
async def test_fence_mid_flood_stops_every_write(start_blockd, tmp_path):
    disk = make_image(tmp_path / "disk.img", IMAGE)
    server = start_blockd({"disk": disk})
    victim = await raw_open(server.nbd_port, "disk@nodeA:1a2b")
    bystander = await raw_open(server.nbd_port, "disk@nodeB:77")
    flood = Flood(victim)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(flood.run)
        while len(flood.acked) < 200:
            await trio.sleep(0.01)
        status = await server_status(server.control)
        assert any(s["node"] == "nodeA" for s in status["sessions"])
        answer = await fence_node(server.control, "nodeA", epoch=5)
        assert answer["status"] == "CONFIRMED", answer
        snapshot = disk.read_bytes()
        acked_at_confirm = set(flood.acked)
        with trio.fail_after(30):
            await flood.ended.wait()  # the server closed the victim's connection
    await trio.sleep(1.0)  # anything still in flight anywhere would land now
    assert disk.read_bytes() == snapshot, "a block changed after FENCE was confirmed"
    assert set(flood.acked) == acked_at_confirm, "a write was acknowledged after confirm"
    assert len(flood.acked) < SLOTS, "the flood finished before the fence hit"

    # Every acknowledged write landed; every refused (EPERM) write never executed.
    for slot in flood.acked:
        assert snapshot[slot * CHUNK : (slot + 1) * CHUNK] == flood.payloads[slot]
    for slot in flood.refused:
        assert snapshot[slot * CHUNK : (slot + 1) * CHUNK] == bytes(CHUNK)

    # The fenced node cannot come back, under the old or a new incarnation...
    for name in ("disk@nodeA:1a2b", "disk@nodeA:1a2c"):
        kind, message = await go_refusal(server.nbd_port, name)
        assert kind == Rep.ERR_POLICY and b"fenced" in message
    # ...while another node keeps working on its open session.
    error, data = await bystander.call(Cmd.READ, 0, 4096)
    assert error == 0 and len(data) == 4096
    await bystander.aclose()

    # UNFENCE lets it in again.
    assert (await unfence_node(server.control, "nodeA", epoch=6))["status"] == "OK"
    again = await raw_open(server.nbd_port, "disk@nodeA:1a2c")
    error, _ = await again.call(Cmd.WRITE, 0, 4096, bytes(4096))
    assert error == 0
    await again.aclose()


@pytest.mark.timeout(60)
async def test_fence_table_survives_sigkill_and_admit_rules(start_blockd, tmp_path):
    disk = make_image(tmp_path / "disk.img", 1 << 20)
    server = start_blockd({"disk": disk})
    answer = await fence_node(server.control, "nodeA", epoch=4, incarnation=0xAA)
    assert answer["status"] == "CONFIRMED"
    server.proc.kill()  # no clean shutdown: the ban must already be on disk
    server.proc.wait()
    table = json.loads((server.workdir / "state" / "fence-table.json").read_text())
    assert table["nodes"]["nodeA"]["banned"] == ["aa"]

    server.start()
    assert "fenced nodes ['nodeA']" in server.log_text()
    for name in ("disk@nodeA:aa", "disk@nodeA:bb"):
        kind, _ = await go_refusal(server.nbd_port, name)
        assert kind == Rep.ERR_POLICY
    # A delayed ADMIT from an older view must not undo the fence.
    stale = await admit_node(server.control, "nodeA", 0xBB, epoch=3)
    assert stale["status"] == "ERROR" and "stale epoch" in stale["reason"]
    # The banned incarnation can never be re-admitted; a new one can.
    assert (await admit_node(server.control, "nodeA", 0xAA, epoch=5))["status"] == "ERROR"
    assert (await admit_node(server.control, "nodeA", 0xBB, epoch=5))["status"] == "OK"
    client = await raw_open(server.nbd_port, "disk@nodeA:bb")
    assert (await client.call(Cmd.READ, 0, 512))[0] == 0
    await client.aclose()
    kind, _ = await go_refusal(server.nbd_port, "disk@nodeA:aa")
    assert kind == Rep.ERR_POLICY


@pytest.mark.timeout(60)
async def test_session_fence_closes_one_session_only(start_blockd, tmp_path):
    disk = make_image(tmp_path / "disk.img", 1 << 20)
    server = start_blockd({"disk": disk})
    first = await raw_open(server.nbd_port, "disk@nodeA:1")
    second = await raw_open(server.nbd_port, "disk@nodeA:1")
    session_id = dict(item.strip().split("=", 1) for item in first.description.split(";"))[
        "session"
    ]
    answer = await session_fence(server.control, session_id)
    assert answer == {"status": "CONFIRMED", "sessions_closed": [session_id]}
    with trio.fail_after(10):
        assert await first.at_eof()
    # The node is not banned: its other session and new sessions keep working.
    assert (await second.call(Cmd.READ, 0, 512))[0] == 0
    third = await raw_open(server.nbd_port, "disk@nodeA:1")
    assert (await third.call(Cmd.READ, 0, 512))[0] == 0
    # Fencing a session that is already gone is trivially drained.
    assert (await session_fence(server.control, session_id))["status"] == "CONFIRMED"
    await second.aclose()
    await third.aclose()


@pytest.mark.timeout(60)
async def test_anonymous_client_is_fenced_by_peer_address(start_blockd, tmp_path):
    server = start_blockd({"disk": make_image(tmp_path / "disk.img", 1 << 20)})
    client = await raw_open(server.nbd_port, "disk")
    status = await server_status(server.control)
    assert [s["node"] for s in status["sessions"]] == ["anon-127.0.0.1"]
    assert status["sessions"][0]["authenticated"] is False
    answer = await fence_node(server.control, "anon-127.0.0.1", epoch=1)
    assert answer["status"] == "CONFIRMED"
    with trio.fail_after(10):
        assert await client.at_eof()
    kind, _ = await go_refusal(server.nbd_port, "disk")
    assert kind == Rep.ERR_POLICY


@pytest.mark.timeout(60)
async def test_control_channel_rejects_bad_requests(start_blockd, tmp_path):
    server = start_blockd({"disk": make_image(tmp_path / "disk.img", 1 << 20)})
    for op, args in [
        ("FENCE", {}),
        ("FENCE", {"node": "", "epoch": 1}),
        ("FENCE", {"node": "n", "epoch": -1}),
        ("FENCE", {"node": "n", "epoch": 1, "incarnation": "zz"}),
        ("ADMIT", {"node": "n", "epoch": 1}),
        ("SESSION_FENCE", {}),
        ("REBOOT", {}),
    ]:
        answer = await control_call(server.control, op, **args)
        assert answer["status"] == "ERROR", (op, args, answer)
    # Garbage on the control port closes that connection only.
    host, port = server.control.rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(b"\xff\xff\xff\xff garbage")
    with trio.fail_after(10):
        assert await stream.receive_some(100) == b""
    await stream.aclose()
    status = await server_status(server.control)
    assert status["status"] == "OK" and status["fence_table"] == {}


@pytest.mark.timeout(60)
async def test_fencing_one_incarnation_spares_the_admitted_new_one(start_blockd, tmp_path):
    server = start_blockd({"disk": make_image(tmp_path / "disk.img", 1 << 20)})
    old = await raw_open(server.nbd_port, "disk@nodeA:1")
    new = await raw_open(server.nbd_port, "disk@nodeA:2")
    assert (await admit_node(server.control, "nodeA", 2, epoch=7))["status"] == "OK"
    answer = await fence_node(server.control, "nodeA", epoch=7, incarnation=1)
    assert answer["status"] == "CONFIRMED" and len(answer["sessions_closed"]) == 1
    with trio.fail_after(10):
        assert await old.at_eof()
    assert (await new.call(Cmd.WRITE, 0, 512, b"n" * 512))[0] == 0
    kind, _ = await go_refusal(server.nbd_port, "disk@nodeA:1")
    assert kind == Rep.ERR_POLICY
    kind, _ = await go_refusal(server.nbd_port, "disk@nodeA:3")  # not admitted
    assert kind == Rep.ERR_POLICY
    again = await raw_open(server.nbd_port, "disk@nodeA:2")
    await again.aclose()
    await new.aclose()


@pytest.mark.timeout(60)
async def test_fence_confirms_even_when_the_victim_stops_reading(start_blockd, tmp_path):
    """Replies stuck behind a full socket are not I/O: they must not block the fence."""
    server = start_blockd({"disk": make_image(tmp_path / "disk.img", IMAGE)})
    victim = await raw_open(server.nbd_port, "disk@nodeA:9")
    # Ask for far more data than the socket buffers hold, and never read a byte of it.
    for cookie in range(200):
        await victim.send_request(Cmd.READ, cookie, (cookie % 16) * (1 << 20), 1 << 20)

    async def replies_stuck() -> bool:
        sessions = (await server_status(server.control))["sessions"]
        return any(s["node"] == "nodeA" and s["requests"] >= 64 for s in sessions)

    with trio.fail_after(20):
        while not await replies_stuck():
            await trio.sleep(0.05)
    with trio.fail_after(20):
        answer = await fence_node(server.control, "nodeA", epoch=1)
    assert answer["status"] == "CONFIRMED", answer
    assert (await server_status(server.control))["sessions"] == []
    await victim.aclose()


@pytest.mark.timeout(60)
async def test_sigterm_with_io_in_flight_exits_cleanly(start_blockd, tmp_path):
    server = start_blockd({"disk": make_image(tmp_path / "disk.img", IMAGE)})
    client = await raw_open(server.nbd_port, "disk@nodeA:1")
    for cookie in range(32):
        await client.send_request(Cmd.WRITE, cookie, cookie * CHUNK, CHUNK, os.urandom(CHUNK))
    code = await trio.to_thread.run_sync(server.stop)
    assert code == 0
    assert "shutting down" in server.log_text()
    await client.aclose()


@pytest.mark.timeout(90)
async def test_fence_at_both_servers_of_one_lun_stops_both_paths(start_blockd, tmp_path):
    """Two servers export one image (two paths to one LUN); the node floods both.
    Once both confirmed, nothing the node sent through either path lands any more."""
    disk = make_image(tmp_path / "lun.img", IMAGE)
    servers = [start_blockd({"lun": disk}, workdir=f"server{i}") for i in (1, 2)]
    floods = []
    for server in servers:
        client = await raw_open(server.nbd_port, "lun@nodeA:5")
        floods.append(Flood(client, depth=16))
    # Each path writes its own half of the slots, so the two floods never overlap.
    async with trio.open_nursery() as nursery:
        for i, flood in enumerate(floods):
            nursery.start_soon(flood.run_range, i * (SLOTS // 2), (i + 1) * (SLOTS // 2))
        while min(len(f.acked) for f in floods) < 100:
            await trio.sleep(0.01)
        answers = {}

        async def fence_at(server) -> None:
            answers[server.control] = await fence_node(server.control, "nodeA", epoch=3)

        async with trio.open_nursery() as fencing:
            for server in servers:
                fencing.start_soon(fence_at, server)
        assert all(a["status"] == "CONFIRMED" for a in answers.values()), answers
        snapshot = disk.read_bytes()
        assert all(len(f.acked) < SLOTS // 2 for f in floods), "a flood ended before the fence"
        with trio.fail_after(30):
            for flood in floods:
                await flood.ended.wait()
    await trio.sleep(1.0)
    assert disk.read_bytes() == snapshot
    for flood in floods:
        for slot in flood.acked:
            assert snapshot[slot * CHUNK : (slot + 1) * CHUNK] == flood.payloads[slot]
        for slot in flood.refused:
            assert snapshot[slot * CHUNK : (slot + 1) * CHUNK] == bytes(CHUNK)
