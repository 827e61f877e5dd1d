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

from gfspy.blockd.control_client import fence_node, server_status
from gfspy.nbd.wire import Cmd, NbdErrno

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
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=30)
        if os.path.ismount(mnt):
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
