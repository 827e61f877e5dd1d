"""A FENCE whose drain cannot finish answers FAILED, never CONFIRMED.

The backing file lives on a small FUSE filesystem (tests/blockd/slowfs.py) whose writes
block while a stall file exists: the real kernel path of a LUN whose I/O hangs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from gfspy.blockd.control_client import fence_node, server_status, session_fence
from gfspy.nbd.wire import Cmd, NbdErrno

from .conftest import make_image
from .harness import REPO, RawNbd

SIZE = 1 << 20


@pytest.fixture
def slow_disk(tmp_path: Path):
    """(path of the FUSE-backed image, stall file path); unmounted on teardown."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    stall = tmp_path / "stall"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.blockd.slowfs", str(mnt), str(SIZE), str(stall)], cwd=REPO
    )
    try:
        deadline = time.monotonic() + 15
        while not os.path.ismount(mnt):
            assert proc.poll() is None, "slowfs exited"
            assert time.monotonic() < deadline, "slowfs did not mount"
            time.sleep(0.05)
        yield mnt / "disk.img", stall
    finally:
        stall.unlink(missing_ok=True)
        unmount = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=30)
        if unmount.returncode != 0:  # busy, or its daemon died: detach it lazily
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, timeout=30)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_for(predicate, what: str, timeout: float = 20) -> None:
    with trio.fail_after(timeout):
        while not await predicate():
            await trio.sleep(0.05)


@pytest.mark.timeout(90)
async def test_stuck_write_makes_fence_fail_and_later_writes_get_eperm(slow_disk, start_blockd):
    # slow_disk comes first so that it is torn down last, after the server stopped.
    image, stall = slow_disk
    server = start_blockd({"disk": image}, "--drain-timeout", "1.5")
    client = await RawNbd.connect(server.nbd_port)
    await client.open("disk@nodeS:5")
    stall.touch()
    await client.send_request(Cmd.WRITE, 1, 0, 4096, b"\x11" * 4096)

    async def write_in_flight() -> bool:
        sessions = (await server_status(server.control))["sessions"]
        return any(s["node"] == "nodeS" and s["in_flight"] == 1 for s in sessions)

    await wait_for(write_in_flight, "the write to be stuck in the backend")

    answer = await fence_node(server.control, "nodeS", epoch=2)
    assert answer["status"] == "FAILED"
    assert "drain timeout" in answer["reason"]

    # The session is fenced though: a new request is refused, never executed.
    await client.send_request(Cmd.WRITE, 2, 8192, 4096, b"\x22" * 4096)
    cookie, error, _ = await client.read_reply({})
    assert (cookie, error) == (2, NbdErrno.EPERM)

    # Release the stuck write: the session drains, is closed late, and a repeated FENCE
    # (nothing left to drain) confirms.
    stall.unlink()
    with trio.fail_after(20):
        assert await client.at_eof()
    assert (await fence_node(server.control, "nodeS", epoch=2))["status"] == "CONFIRMED"
    data = image.read_bytes()
    assert data[:4096] == b"\x11" * 4096  # the dispatched write did complete
    assert data[8192 : 8192 + 4096] == bytes(4096)  # the refused one never ran
    assert "drained late and closed" in server.log_text()
    await client.aclose()


@pytest.mark.timeout(90)
async def test_requests_queued_behind_a_hung_disk_do_not_block_a_fence(
    slow_disk, start_blockd, tmp_path
):
    """Every I/O thread is stuck on another export: the victim's queued writes were
    never dispatched, so its fence confirms at once and they never run."""
    from gfspy.blockd.server import IO_THREADS

    image, stall = slow_disk
    healthy = make_image(tmp_path / "healthy.img", SIZE)
    server = start_blockd({"slow": image, "fast": healthy}, "--drain-timeout", "30")
    hog = await RawNbd.connect(server.nbd_port)
    await hog.open("slow@nodeH:1")
    stall.touch()
    for cookie in range(IO_THREADS):
        await hog.send_request(Cmd.WRITE, cookie, (cookie % 64) * 4096, 4096, b"h" * 4096)

    async def all_threads_stuck() -> bool:
        sessions = (await server_status(server.control))["sessions"]
        return any(s["node"] == "nodeH" and s["in_flight"] == IO_THREADS for s in sessions)

    await wait_for(all_threads_stuck, "every I/O thread to be stuck")
    victim = await RawNbd.connect(server.nbd_port)
    await victim.open("fast@nodeV:1")
    for cookie in range(8):
        await victim.send_request(Cmd.WRITE, cookie, cookie * 4096, 4096, b"v" * 4096)

    async def victim_queued() -> bool:
        sessions = (await server_status(server.control))["sessions"]
        return any(s["node"] == "nodeV" and s["queued"] == 8 for s in sessions)

    await wait_for(victim_queued, "the victim's writes to wait for a thread")
    with trio.fail_after(10):
        answer = await fence_node(server.control, "nodeV", epoch=1)
    assert answer["status"] == "CONFIRMED", answer
    stall.unlink()
    with trio.fail_after(20):  # the hung writes complete; then the queue moves on
        for _ in range(IO_THREADS):
            _, error, _ = await hog.read_reply({})
            assert error == 0
        assert (await hog.call(Cmd.FLUSH))[0] == 0  # queued behind everything above
    assert healthy.read_bytes() == bytes(SIZE), "a fenced, never-dispatched write ran"
    await hog.aclose()
    await victim.aclose()


@pytest.mark.timeout(90)
async def test_a_vanished_client_stays_fenceable_until_its_io_returned(slow_disk, start_blockd):
    """The multipath client's quiesce rule: its connection broke with a write still
    inside the server.  SESSION_FENCE must not confirm until that write has returned,
    and writes it had queued behind it must never start."""
    image, stall = slow_disk
    server = start_blockd({"disk": image}, "--drain-timeout", "1.5")
    client = await RawNbd.connect(server.nbd_port)
    await client.open("disk@nodeQ:1")
    session_id = dict(p.strip().split("=", 1) for p in client.description.split(";"))["session"]
    stall.touch()
    await client.send_request(Cmd.WRITE, 1, 0, 4096, b"\x33" * 4096)

    async def stuck() -> bool:
        sessions = (await server_status(server.control))["sessions"]
        return any(s["session_id"] == session_id and s["in_flight"] == 1 for s in sessions)

    await wait_for(stuck, "the write to be stuck")
    await client.aclose()  # the path "breaks" with the write in doubt

    async def closing() -> bool:
        sessions = (await server_status(server.control))["sessions"]
        return any(s["session_id"] == session_id and s["closing"] for s in sessions)

    await wait_for(closing, "the server to notice the connection is gone")
    answer = await session_fence(server.control, session_id)
    assert answer["status"] == "FAILED" and "drain timeout" in answer["reason"]
    stall.unlink()

    async def gone() -> bool:
        sessions = (await server_status(server.control))["sessions"]
        return all(s["session_id"] != session_id for s in sessions)

    await wait_for(gone, "the session to leave once its write returned")
    assert (await session_fence(server.control, session_id))["status"] == "CONFIRMED"
    assert image.read_bytes()[:4096] == b"\x33" * 4096
