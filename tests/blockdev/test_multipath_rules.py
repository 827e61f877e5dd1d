"""Multipath rules besides failover: identity checks, bounded queueing, configuration."""

from __future__ import annotations

import errno

import pytest
import trio

from gfspy.blockdev.device import DeviceError, open_device
from gfspy.blockdev.multipath import MultipathConfig, MultipathDevice, PathState

from .servers import Blockd, make_image

MiB = 1 << 20


async def wait_for(predicate, timeout: float, what: str) -> None:
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.05)
        return
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def servers(tmp_path):
    image = make_image(tmp_path / "lun.img", 8 * MiB)
    started: list[Blockd] = []

    def start(name: str, wwid: str = "gfspy-test-wwid-0001", img=image) -> Blockd:
        s = Blockd(img, tmp_path / name, wwid=wwid)
        started.append(s)
        return s.start()

    yield image, start
    for s in started:
        s.stop()


@pytest.mark.timeout(60)
async def test_paths_to_different_luns_are_not_one_device(servers, tmp_path):
    _, start = servers
    a = start("a")
    other = start("b", wwid="another-lun", img=make_image(tmp_path / "other.img", 8 * MiB))
    with pytest.raises(DeviceError) as e:
        await open_device(f"{a.uri()},{other.uri()}")
    assert e.value.errno == errno.EINVAL and "not the same device" in e.value.strerror


@pytest.mark.timeout(60)
async def test_path_whose_identity_changes_on_reconnect_is_refused(servers):
    _, start = servers
    a, b = start("a"), start("b")
    dev = await MultipathDevice.open([a.uri(), b.uri()], MultipathConfig(polling_interval=0.3))
    try:
        await dev.write(0, b"x" * 4096)
        await trio.to_thread.run_sync(a.stop)
        await wait_for(lambda: not dev.paths[0].usable, 30, "path A failed")
        a.wwid = "swapped-cable"  # same address, different LUN behind it
        await trio.to_thread.run_sync(a.start)
        await wait_for(lambda: "identity changed" in dev.paths[0].reason, 30, "refusal")
        await trio.sleep(1.0)
        assert dev.paths[0].state == PathState.FAILED and not dev.paths[0].usable
        await dev.write(4096, b"y" * 4096)  # still served by B
        assert await dev.read(0, 8192) == b"x" * 4096 + b"y" * 4096
    finally:
        await dev.aclose()


@pytest.mark.timeout(60)
async def test_no_path_retry_queues_then_fails_with_eio(servers):
    _, start = servers
    a, b = start("a"), start("b")
    # A generous budget (60 x 0.3 s) so a server restart on a loaded machine fits in it.
    config = MultipathConfig(polling_interval=0.3, no_path_retry=60, io_timeout=5)
    dev = await MultipathDevice.open([a.uri(), b.uri()], config)
    try:
        await dev.write(0, b"q" * 4096)
        await trio.to_thread.run_sync(a.kill)
        await trio.to_thread.run_sync(b.kill)
        result: list[bytes] = []

        async def queued_read() -> None:
            result.append(await dev.read(0, 4096))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(queued_read)
            await trio.sleep(0.5)
            assert not result  # queued: no path
            await trio.to_thread.run_sync(b.start)  # a path returns within the budget
        assert result == [b"q" * 4096]
    finally:
        await dev.aclose()

    # A small budget that runs out: EIO, never a hang.
    short = MultipathConfig(polling_interval=0.3, no_path_retry=3, io_timeout=5)
    dev = await MultipathDevice.open([a.uri(), b.uri()], short)  # A is down, B is back
    try:
        assert await dev.read(0, 4096) == b"q" * 4096
        await trio.to_thread.run_sync(b.kill)
        with pytest.raises(DeviceError) as e:
            await dev.read(0, 4096)
        assert e.value.errno == errno.EIO and "no usable path" in e.value.strerror
    finally:
        await dev.aclose()


@pytest.mark.timeout(30)
async def test_no_path_retry_zero_fails_at_once(servers):
    _, start = servers
    a = start("a")
    dev = await MultipathDevice.open([a.uri()], MultipathConfig(no_path_retry=0, io_timeout=5))
    try:
        await trio.to_thread.run_sync(a.kill)
        with pytest.raises(DeviceError) as e:
            await dev.read(0, 4096)
        assert e.value.errno == errno.EIO
    finally:
        await dev.aclose()


@pytest.mark.timeout(30)
async def test_read_only_map_refuses_writes(servers):
    _, start = servers
    a = start("a")
    dev = await open_device(f"{a.uri()},{a.uri()}", readonly=True)
    try:
        with pytest.raises(DeviceError) as e:
            await dev.write(0, bytes(4096))
        assert e.value.errno == errno.EROFS
        assert await dev.read(0, 4096) == bytes(4096)
    finally:
        await dev.aclose()


def test_config_validation():
    cfg = MultipathConfig.from_mapping({"policy": "multibus", "rr_min_io": 2, "failback": 30})
    assert cfg.policy == "multibus" and cfg.failback == 30
    for bad in (
        {"policy": "round-robin"},
        {"rr_min_io": 0},
        {"no_path_retry": -1},
        {"failback": "followover"},
        {"polling_interval": 0},
        {"queue_if_no_path": True},
    ):
        with pytest.raises((ValueError, TypeError)):
            MultipathConfig.from_mapping(bad)


@pytest.mark.timeout(60)
async def test_deferred_failback_waits_for_a_healthy_path(servers):
    _, start = servers
    a, b = start("a"), start("b")
    config = MultipathConfig(polling_interval=0.2, failback=1.0, io_timeout=5)
    dev = await MultipathDevice.open([a.uri(), b.uri()], config)
    try:
        await trio.to_thread.run_sync(a.kill)
        await dev.write(0, b"1" * 4096)  # fails over to B
        assert dev.active_group == 1
        await trio.to_thread.run_sync(a.start)
        await wait_for(lambda: dev.paths[0].usable, 30, "path A reinstated")
        reinstated_at = dev.paths[0].ready_since
        await wait_for(lambda: dev.active_group == 0, 30, "deferred failback")
        # The code only fails back once the path has been up for `failback` seconds.
        assert trio.current_time() - reinstated_at >= config.failback
        before = dev.paths[0].requests
        await dev.write(4096, b"2" * 4096)
        assert dev.paths[0].requests == before + 1
    finally:
        await dev.aclose()


@pytest.mark.timeout(30)
async def test_multibus_round_robin_honours_rr_min_io(servers):
    image, start = servers
    a, b = start("a"), start("b")
    dev = await MultipathDevice.open(
        [a.uri(), b.uri()], MultipathConfig(policy="multibus", rr_min_io=3)
    )
    try:
        order = []
        for i in range(12):
            before = [p.requests for p in dev.paths]
            await dev.write(i * 4096, bytes([65 + i]) * 4096)
            order.append(next(j for j, p in enumerate(dev.paths) if p.requests > before[j]))
        assert order == [0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1]
        assert dev.status()["groups"][0]["status"] == "active"
        await dev.flush()
    finally:
        await dev.aclose()
    assert image.read_bytes()[: 12 * 4096] == b"".join(bytes([65 + i]) * 4096 for i in range(12))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("selector", ["queue-length", "service-time"])
async def test_load_aware_selectors_avoid_a_slow_path(tmp_path, selector):
    from .servers import start_nbdkit, stop

    image = make_image(tmp_path / "lun.img", 4 * MiB)
    slow, slow_port = start_nbdkit("--filter=delay", "file", str(image), "delay-read=3")
    fast, fast_port = start_nbdkit("file", str(image))
    try:
        dev = await MultipathDevice.open(
            [f"nbd://127.0.0.1:{slow_port}/", f"nbd://127.0.0.1:{fast_port}/"],
            MultipathConfig(policy="multibus", path_selector=selector, io_timeout=10),
        )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(dev.read, 0, 4096)  # first pick: the slow path
                await trio.sleep(0.1)
                for i in range(1, 12):  # while it is busy, everything goes to the idle path
                    await dev.read(i * 4096, 4096)
            assert dev.paths[0].requests == 1 and dev.paths[1].requests == 11
        finally:
            await dev.aclose()
    finally:
        stop(slow)
        stop(fast)


@pytest.mark.timeout(60)
async def test_recheck_catches_one_wwid_given_to_two_luns(servers, tmp_path):
    image, start = servers
    other = make_image(tmp_path / "other.img", 8 * MiB)
    with open(image, "r+b") as f:
        f.seek(65536)
        f.write(b"superblock of the real LUN".ljust(4096, b"\0"))
    with open(other, "r+b") as f:
        f.seek(65536)
        f.write(b"superblock of another LUN".ljust(4096, b"\0"))
    a = start("a")
    liar = start("b", img=other)  # same WWID, same size: only the content tells
    uris = [a.uri(), liar.uri()]
    with pytest.raises(DeviceError) as e:
        await MultipathDevice.open(uris, MultipathConfig(recheck_offset=65536))
    assert e.value.errno == errno.EINVAL and "despite the same WWID" in e.value.strerror

    # On reinstatement: path B comes back serving the other file (a swapped cable).
    b = start("b2")
    config = MultipathConfig(recheck_offset=65536, polling_interval=0.3)
    dev = await MultipathDevice.open([a.uri(), b.uri()], config)
    try:
        await trio.to_thread.run_sync(b.kill)
        await wait_for(lambda: not dev.paths[1].usable, 30, "path B failed")
        b.image = other
        await trio.to_thread.run_sync(b.start)
        await wait_for(lambda: "differs" in dev.paths[1].reason, 30, "content refusal")
        assert not dev.paths[1].usable
    finally:
        await dev.aclose()
