"""Failover between two gfspy-blockd processes exporting ONE image file.

A writer streams writes through the multipath device while one server is killed with
SIGKILL; the writer must see no error, the stall is recorded (and only bounded by
polling_interval + 2 s), the image must hold exactly what was written, and failback
must follow the configuration when the server comes back.
"""

from __future__ import annotations

import hashlib
import logging

import pytest
import trio

from gfspy.blockdev.multipath import MultipathConfig, MultipathDevice, PathState

from .servers import Blockd, make_image

log = logging.getLogger(__name__)

BLOCK = 64 * 1024
IMAGE_SIZE = 32 * 1024 * 1024


def pattern(i: int) -> bytes:
    """A block whose content says which write produced it."""
    seed = hashlib.sha256(i.to_bytes(8, "big")).digest()
    return (seed * (BLOCK // len(seed)))[:BLOCK]


async def wait_for(predicate, timeout: float, what: str) -> None:
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.05)
        return
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def two_servers(tmp_path):
    image = make_image(tmp_path / "lun.img", IMAGE_SIZE)
    a = Blockd(image, tmp_path / "a")
    b = Blockd(image, tmp_path / "b")
    try:
        a.start()
        b.start()
        yield image, a, b
    finally:
        a.stop()
        b.stop()


async def run_writer(
    dev, first: int, count: int, gaps: list[float], expected: dict[int, bytes], writers: int = 4
):
    """Write `count` blocks with several writes in flight, recording gaps between completions."""
    nblocks = IMAGE_SIZE // BLOCK
    last = trio.current_time()

    async def writer(start: int) -> None:
        nonlocal last
        for i in range(start, first + count, writers):
            slot = i % nblocks
            data = pattern(i)
            await dev.write(slot * BLOCK, data)
            expected[slot] = data
            now = trio.current_time()
            gaps.append(now - last)
            last = now

    async with trio.open_nursery() as nursery:
        for w in range(writers):
            nursery.start_soon(writer, first + w)


@pytest.mark.timeout(90)
async def test_sigkill_mid_write_fails_over_and_fails_back(two_servers):
    image, a, b = two_servers
    config = MultipathConfig(
        policy="failover", polling_interval=1.0, io_timeout=3.0, failback="immediate",
        no_path_retry=5,
    )  # fmt: skip
    dev = await MultipathDevice.open([a.uri(), b.uri()], config)
    try:
        assert dev.status()["groups"][0]["status"] == "active"
        gaps: list[float] = []
        expected: dict[int, bytes] = {}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_writer, dev, 0, 400, gaps, expected)
            await wait_for(lambda: len(gaps) >= 100, 30, "first writes")
            await trio.to_thread.run_sync(a.kill)  # SIGKILL mid-write
        stall = max(gaps)
        log.info("failover stall: %.3f s (polling_interval %.1f s)", stall, config.polling_interval)
        print(f"failover stall after SIGKILL: {stall:.3f} s")
        assert stall < config.polling_interval + 2.0
        paths = dev.status()["groups"]
        assert paths[0]["paths"][0]["state"] == PathState.FAILED
        assert dev.active_group == 1
        b_requests = dev.paths[1].requests
        assert b_requests > 0

        # The server comes back on the same port: reinstated, then immediate failback.
        await trio.to_thread.run_sync(a.start)
        await wait_for(lambda: dev.paths[0].usable, 30, "path A reinstated")
        await wait_for(lambda: dev.active_group == 0, 30, "failback to group 0")
        a_before = dev.paths[0].requests
        await run_writer(dev, 400, 50, gaps, expected)
        assert dev.paths[0].requests >= a_before + 50
        await dev.flush()
    finally:
        await dev.aclose()
    content = image.read_bytes()
    for slot, data in expected.items():
        assert content[slot * BLOCK : (slot + 1) * BLOCK] == data, f"block {slot} differs"


@pytest.mark.timeout(60)
async def test_manual_failback_stays_on_the_surviving_path(two_servers):
    image, a, b = two_servers
    config = MultipathConfig(polling_interval=0.5, io_timeout=3.0, failback="manual")
    dev = await MultipathDevice.open([a.uri(), b.uri()], config)
    try:
        await dev.write(0, pattern(1))
        await trio.to_thread.run_sync(a.kill)
        await dev.write(BLOCK, pattern(2))  # fails over
        assert dev.active_group == 1
        await trio.to_thread.run_sync(a.start)
        await wait_for(lambda: dev.paths[0].usable, 30, "path A reinstated")
        await trio.sleep(3 * config.polling_interval)
        assert dev.active_group == 1  # manual: no automatic failback
        dev.switch_group(0)  # the operator's failback
        before = dev.paths[0].requests
        await dev.write(2 * BLOCK, pattern(3))
        assert dev.paths[0].requests == before + 1
    finally:
        await dev.aclose()
    content = image.read_bytes()
    assert content[: 3 * BLOCK] == pattern(1) + pattern(2) + pattern(3)


@pytest.mark.timeout(60)
async def test_frozen_server_in_doubt_write_never_overwrites_a_newer_one(two_servers):
    """§3.7: a write stuck in a frozen server must land before any newer write."""
    import signal

    image, a, b = two_servers
    config = MultipathConfig(polling_interval=5.0, io_timeout=1.0, quiesce_timeout=30)
    dev = await MultipathDevice.open([a.uri(), b.uri()], config)
    try:
        await dev.write(0, b"z" * BLOCK)
        a.proc.send_signal(signal.SIGSTOP)
        done: list[str] = []

        async def write(tag: str, data: bytes) -> None:
            await dev.write(10 * BLOCK, data)
            done.append(tag)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(write, "old", b"o" * BLOCK)  # goes to frozen A: in doubt
                await trio.sleep(1.5)
                nursery.start_soon(write, "new", b"n" * BLOCK)  # must wait for the quiesce
                assert await dev.read(0, BLOCK) == b"z" * BLOCK  # reads carry on via B
                await trio.sleep(1.0)
                assert done == []  # nothing written while A's session is not drained
                a.proc.send_signal(signal.SIGCONT)  # A wakes up and lands its stale copy
        finally:
            a.proc.send_signal(signal.SIGCONT)
        assert done == ["old", "new"]
        assert await dev.read(10 * BLOCK, BLOCK) == b"n" * BLOCK
        await dev.flush()
    finally:
        await dev.aclose()
    assert image.read_bytes()[10 * BLOCK : 11 * BLOCK] == b"n" * BLOCK


@pytest.mark.timeout(60)
async def test_unreachable_server_is_fenced_through_the_cluster_hook(two_servers, caplog):
    """§3.7 rule 3(b): control channel silent too, so the server itself gets fenced."""
    import signal

    image, a, b = two_servers
    fenced: list[str] = []

    async def fence_server(server: str) -> bool:
        # Stands in for the cluster manager's power fence of the whole server.
        fenced.append(server)
        await trio.to_thread.run_sync(a.kill)
        return True

    config = MultipathConfig(
        polling_interval=5.0, checker_timeout=1.0, io_timeout=1.0, quiesce_timeout=30
    )
    dev = await MultipathDevice.open([a.uri(), b.uri()], config, fence_server=fence_server)
    try:
        a.proc.send_signal(signal.SIGSTOP)  # data and control channel both frozen
        await dev.write(3 * BLOCK, b"k" * BLOCK)  # in doubt on A, then reissued on B
        assert fenced == [f"127.0.0.1:{a.port}"]
        assert "server fenced by the cluster manager" in caplog.text
        await dev.flush()
    finally:
        a.proc.send_signal(signal.SIGCONT)
        await dev.aclose()
    assert image.read_bytes()[3 * BLOCK : 4 * BLOCK] == b"k" * BLOCK
