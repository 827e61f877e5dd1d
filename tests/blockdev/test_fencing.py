"""A fenced node (EPERM) fails everything and never retries on another path."""

from __future__ import annotations

import errno
import os

import pytest
import trio

from gfspy.blockd.control_client import fence_node, is_confirmed
from gfspy.blockdev.device import DeviceError
from gfspy.blockdev.multipath import MultipathConfig, MultipathDevice, PathState
from gfspy.blockdev.nbd import FencedError

from .servers import Blockd, make_image, start_nbdkit, stop

MiB = 1 << 20


@pytest.mark.timeout(60)
async def test_eperm_reply_fences_the_whole_device_without_retry(tmp_path):
    # nbdkit's error filter answers EPERM to writes while the trigger file exists: a
    # real server sending the exact reply a fencing server sends to a fenced node.
    image = make_image(tmp_path / "lun.img", 8 * MiB)
    trigger = tmp_path / "fenced-now"
    a, a_port = start_nbdkit(
        "--filter=error", "file", str(image),
        "error=EPERM", "error-pwrite-rate=100%", f"error-pwrite-file={trigger}",
    )  # fmt: skip
    b, b_port = start_nbdkit("file", str(image))
    fenced_reasons: list[str] = []
    dev = await MultipathDevice.open(
        [f"nbd://127.0.0.1:{a_port}/", f"nbd://127.0.0.1:{b_port}/"],
        MultipathConfig(policy="failover", polling_interval=0.5, io_timeout=5),
        on_fenced=fenced_reasons.append,
    )
    try:
        await dev.write(0, b"A" * 4096)
        assert dev.paths[0].requests == 1 and dev.paths[1].requests == 0
        trigger.touch()
        with pytest.raises(FencedError) as e:
            await dev.write(4096, b"B" * 4096)
        assert e.value.errno == errno.EPERM
        # No retry elsewhere: path B never saw a request, and everything now fails.
        assert dev.paths[1].requests == 0
        assert dev.fenced and fenced_reasons
        assert dev.paths[0].state == PathState.FENCED
        for op in (dev.read(0, 4096), dev.write(0, b"C" * 4096), dev.flush()):
            with pytest.raises(DeviceError) as e:
                await op
            assert e.value.errno == errno.EPERM
        await trio.sleep(1.5)  # the checker must not bring anything back
        assert dev.paths[1].requests == 0
        assert dev.status()["fenced"]
    finally:
        await dev.aclose()
        stop(a)
        stop(b)
    assert image.read_bytes()[:8192] == b"A" * 4096 + bytes(4096)


@pytest.mark.timeout(90)
async def test_fence_at_every_server_mid_flood_stops_all_writes(tmp_path):
    image = make_image(tmp_path / "lun.img", 16 * MiB)
    servers = [Blockd(image, tmp_path / "a").start(), Blockd(image, tmp_path / "b").start()]
    try:
        dev = await MultipathDevice.open(
            [s.uri("node7") for s in servers],
            MultipathConfig(policy="multibus", rr_min_io=4, polling_interval=0.5, io_timeout=5),
        )
        errors: list[int] = []
        written = 0

        async def flood(start: int) -> None:
            nonlocal written
            block = os.urandom(65536)
            off = start
            while True:
                try:
                    await dev.write(off, block)
                except DeviceError as e:
                    errors.append(e.errno)
                    return
                written += 1
                off = (off + 4 * 65536) % image.stat().st_size

        try:
            async with trio.open_nursery() as nursery:
                for i in range(4):
                    nursery.start_soon(flood, i * 65536)
                while written < 50:
                    await trio.sleep(0.01)
                answers: list[dict] = []

                async def fence(server: Blockd) -> None:
                    answers.append(await fence_node(server.control, "node7", epoch=1, timeout=30))

                async with trio.open_nursery() as fencers:
                    for s in servers:
                        fencers.start_soon(fence, s)
                assert all(is_confirmed(a) for a in answers), answers
                snapshot = image.read_bytes()
            # Every writer stopped with EPERM (or EIO for an in-doubt write), none hangs.
            assert len(errors) == 4
            assert set(errors) <= {errno.EPERM, errno.EIO}
            assert errno.EPERM in errors or dev.fenced
            await trio.sleep(1.0)
            assert image.read_bytes() == snapshot  # nothing lands after CONFIRMED
            with pytest.raises(DeviceError) as e:
                await dev.read(0, 4096)
            assert e.value.errno == errno.EPERM
        finally:
            await dev.aclose()
    finally:
        for s in servers:
            s.stop()
