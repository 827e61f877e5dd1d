"""Fence methods one by one: the fence-agent convention, storage fencing at real
gfspy-blockd servers (all must confirm), manual acknowledgement, retry with backoff."""

from __future__ import annotations

import time

import pytest
import trio

from gfspy.cluster.config import parse_config
from gfspy.cluster.fencing import (
    FenceError,
    Fencer,
    SelfFenced,
    agent_stdin,
    backoff_delay,
    fence_at_storage,
    run_agent,
)
from gfspy.cluster.heartbeat import (
    FailureDetector,
    Packet,
    PeerAlive,
    PeerFailed,
    PeerLate,
    PeerRestarted,
    decode_packet,
    encode_packet,
)

from .harness import BlockServer, agent_calls, free_tcp_port, write_agent


def config_with(fence: list[dict], storage: list[BlockServer] = (), **timeouts: float):
    data = {
        "cluster": {"name": "f"},
        "timeouts": {"fence_retry": 0.05, "fence_retry_max": 0.2, "fence_timeout": 5.0,
                     **timeouts},
        "storage": [{"name": s.name, "nbd": f"nbd://{s.nbd}/lun", "control": s.control}
                    for s in storage],
        "node": [
            {"id": i, "name": f"n{i}", "address": f"127.0.0.{i}:21064", "fence": fence}
            for i in (1, 2)
        ],
    }  # fmt: skip
    return parse_config(data)


@pytest.mark.timeout(10)
def test_agent_stdin_follows_fence_agents_convention():
    config = config_with(
        [
            {
                "method": "agent",
                "command": "/bin/true",
                "options": {"ip": "10.0.0.9", "plug": 3, "ssl": True},
            }
        ]
    )
    method = config.node(2).fence[0]
    text = agent_stdin(method, config.node(2)).decode()
    assert text == "ip=10.0.0.9\nplug=3\nssl=1\naction=off\nnodename=n2\n"
    explicit = config_with(
        [
            {
                "method": "agent",
                "command": "/bin/true",
                "options": {"action": "reboot", "nodename": "host2"},
            }
        ]
    )
    text = agent_stdin(explicit.node(2).fence[0], explicit.node(2)).decode()
    assert text == "action=reboot\nnodename=host2\n"


@pytest.mark.timeout(30)
async def test_agent_exit_status_is_the_result(tmp_path):
    agent, log, fail = write_agent(tmp_path, failures=1)
    config = config_with([{"method": "agent", "command": str(agent), "options": {"port": "7"}}])
    method, node = config.node(2).fence[0], config.node(2)
    with pytest.raises(FenceError, match="exited with status 1: simulated power switch"):
        await run_agent(method, node, timeout=10)
    assert "Success: Powered OFF" in await run_agent(method, node, timeout=10)
    assert agent_calls(log) == [{"port": "7", "action": "off", "nodename": "n2"}] * 2

    hanging = tmp_path / "fence_hang"
    hanging.write_text("#!/bin/sh\nexec sleep 30\n")
    hanging.chmod(0o755)
    slow = config_with([{"method": "agent", "command": str(hanging)}])
    with pytest.raises(FenceError, match="timed out"):
        await run_agent(slow.node(2).fence[0], node, timeout=0.5)
    missing = config_with([{"method": "agent", "command": str(tmp_path / "nope")}])
    with pytest.raises(FenceError, match="could not run"):
        await run_agent(missing.node(2).fence[0], node, timeout=5)


@pytest.mark.timeout(10)
def test_backoff_doubles_and_is_capped():
    assert [backoff_delay(r, 1.0, 30.0) for r in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff_delay(10_000, 0.5, 5.0) == 5.0


@pytest.mark.timeout(60)
async def test_fence_retried_across_levels_until_success(tmp_path):
    agent, log, fail = write_agent(tmp_path, failures=3)
    config = config_with([
        {"method": "agent", "command": str(tmp_path / "missing-agent")},
        {"method": "agent", "command": str(agent)},
    ])  # fmt: skip
    fencer = Fencer(config, my_id=1)
    failed_at = time.time()
    case = fencer.need_fence(2, 0xABC, epoch=7, failed_at=failed_at)
    assert fencer.outstanding() == [case] and not fencer.is_fenced(2, 0xABC)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fencer.fence_until_done, case)
        with trio.fail_after(30):
            await fencer.wait_fenced([(2, 0xABC)])
    # Each round tries level 1 (cannot run), then level 2 (fails 3 times, then works).
    outcome = [(r.detail.split(":")[0][-14:], r.ok) for r in fencer.history]
    assert [ok for _, ok in outcome] == [False] * 7 + [True]
    assert case.done and case.confirmed_at >= failed_at and case.attempts == 7
    assert "could not run" in case.last_error  # level 1 failed again in the last round
    assert len(agent_calls(log)) == 4


@pytest.mark.timeout(30)
async def test_failing_fence_is_never_skipped(tmp_path):
    agent, _, _ = write_agent(tmp_path, failures=10_000)
    fencer = Fencer(config_with([{"method": "agent", "command": str(agent)}]), my_id=1)
    case = fencer.need_fence(2, 5, epoch=3, failed_at=time.time())
    with trio.move_on_after(2):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fencer.fence_until_done, case)
            await fencer.wait_fenced([(2, 5)])
            pytest.fail("wait_fenced returned although every fence failed")
    assert not case.done and case.attempts >= 3
    assert all(not r.ok for r in fencer.history)


@pytest.mark.timeout(30)
async def test_manual_ack_must_come_after_the_failure():
    fencer = Fencer(config_with([{"method": "manual"}], fence_timeout=10), my_id=1)
    fencer.manual_acks.add(2, when=time.time() - 60)  # an old acknowledgement
    case = fencer.need_fence(2, 9, epoch=4, failed_at=time.time())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fencer.fence_until_done, case)
        await trio.sleep(0.3)
        assert not case.done  # the stale ack does not count
        fencer.manual_acks.add(2)
        with trio.fail_after(5):
            await fencer.wait_fenced([(2, 9)])
    assert fencer.history[-1].method == "manual" and fencer.history[-1].ok


@pytest.mark.timeout(60)
async def test_storage_fence_needs_every_block_server(tmp_path):
    servers = [BlockServer(tmp_path / f"b{i}", name=f"b{i}") for i in (1, 2)]
    try:
        config = config_with([{"method": "storage"}], storage=servers)
        detail = await fence_at_storage(config, 2, 0x1234, epoch=3, timeout=10)
        assert detail == "confirmed by b1, b2"
        for s in servers:
            table = await trio.to_thread.run_sync(s.status)
            assert table["fence_table"]["n2"]["banned"] == ["1234"]
        # One server down: the fence is not confirmed, whatever the other one says.
        servers[1].close()
        with pytest.raises(FenceError, match=r"not confirmed by 1 of 2 servers: b2: "):
            await fence_at_storage(config, 2, 0x5678, epoch=4, timeout=5)
        # A control port where nothing answers at all.
        ghost = [BlockServer.__new__(BlockServer)]
        ghost[0].name, ghost[0].nbd = "ghost", "127.0.0.1:1"
        ghost[0].control = f"127.0.0.1:{free_tcp_port('127.0.0.1')}"
        with pytest.raises(FenceError, match="ghost"):
            await fence_at_storage(
                config_with([{"method": "storage"}], storage=ghost), 2, 1, epoch=5, timeout=2
            )
    finally:
        for s in servers:
            s.close()


@pytest.mark.timeout(10)
def test_heartbeat_packets_and_failure_detector():
    packet = Packet("c", 3, 0xBEEF, "hb", {"m": {"epoch": 4}})
    assert decode_packet(encode_packet(packet)) == packet
    for garbage in (b"", b"\xc1", b"\x93\x01\x02\x03", encode_packet(packet)[:-3]):
        assert decode_packet(garbage) is None

    fd = FailureDetector(my_id=1, timeout=4.0)
    assert fd.heard(2, 10, now=0.0) == [PeerAlive(2, 10)]
    assert fd.heard(1, 99, now=0.0) == []  # ourselves
    assert fd.check(now=2.0) == []
    assert fd.check(now=3.1) == [PeerLate(2, pytest.approx(3.1))]
    assert fd.check(now=3.5) == []  # warned once
    assert fd.heard(2, 10, now=3.6) == []
    assert fd.check(now=7.7) == [PeerFailed(2, 10, pytest.approx(4.1))]
    assert fd.alive() == {}
    fd.heard(3, 1, now=8.0)
    assert fd.heard(3, 2, now=8.1) == [PeerRestarted(3, 1, 2), PeerAlive(3, 2)]
    assert fd.alive() == {3: 2}


@pytest.mark.timeout(30)
async def test_two_node_fence_race_lower_node_goes_first(tmp_path):
    """With fence_delay the higher node waits, so in a split both sides may try but the
    lower node's fence lands first (and a storage fence then cuts the other off)."""
    agent, log, _ = write_agent(tmp_path)
    config = config_with([{"method": "agent", "command": str(agent)}], fence_delay=1.0)
    low, high = Fencer(config, my_id=1), Fencer(config, my_id=2)
    now = time.time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(high.fence_until_done, high.need_fence(1, 11, 2, now))
        nursery.start_soon(low.fence_until_done, low.need_fence(2, 22, 2, now))
    assert [c["nodename"] for c in agent_calls(log)] == ["n2", "n1"]


@pytest.mark.timeout(60)
async def test_loser_of_a_storage_fence_race_does_not_fence_back(tmp_path):
    server = BlockServer(tmp_path / "b1", name="b1")
    try:
        config = config_with([{"method": "storage"}], storage=[server], fence_delay=0.3)
        high = Fencer(config, my_id=2, my_incarnation=0x22)
        assert not await high.self_fenced_at_storage()
        # Node 1 won: it fenced node 2's incarnation first.
        await fence_at_storage(config, 2, 0x22, epoch=5, timeout=10)
        case = high.need_fence(1, 0x11, epoch=5, failed_at=time.time())
        with pytest.raises(SelfFenced, match="fenced at the storage first"):
            await high.fence_until_done(case)
        table = (await trio.to_thread.run_sync(server.status))["fence_table"]
        assert "n1" not in table and table["n2"]["banned"] == ["22"]
        assert not case.done and high.history == []
    finally:
        server.close()


@pytest.mark.timeout(10)
def test_authenticated_packets():
    key = b"k" * 32
    packet = Packet("c", 2, 7, "hb", {"f": [[3, 9, 4, 1.0, "storage", 2]]})
    wire = encode_packet(packet, key)
    assert decode_packet(wire, key) == packet
    assert decode_packet(wire, b"x" * 32) is None  # another key
    assert decode_packet(encode_packet(packet), key) is None  # no tag at all
    forged = bytearray(wire)
    forged[10] ^= 1
    assert decode_packet(bytes(forged), key) is None
