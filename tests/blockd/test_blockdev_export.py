"""Exporting a real block device (a loop device): sizes, 4 KiB logical blocks, zeroing.

Also checks the multi-connection promise across two servers exporting one device: a
write acknowledged by one server is read back through the other (nothing is cached).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from gfspy.nbd.wire import Cmd, CmdFlag, NbdErrno

from .conftest import make_image
from .harness import RawNbd

SIZE = 16 << 20


@pytest.fixture
def loop_device(tmp_path):
    """A 16 MiB loop device with 4096-byte logical sectors, detached on teardown."""
    backing = make_image(tmp_path / "loop.img", SIZE)
    result = subprocess.run(
        ["losetup", "--find", "--show", "--sector-size", "4096", "--direct-io=on", str(backing)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, f"losetup failed: {result.stderr}"
    device = result.stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], capture_output=True, timeout=30)


@pytest.mark.timeout(90)
async def test_block_device_export(loop_device, start_blockd, tmp_path):
    server = start_blockd({"lun": loop_device}, "--wwid", "lun=naa.6001405deadbeef")
    info = subprocess.run(
        ["nbdinfo", "--json", server.uri("naa.6001405deadbeef")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert info.returncode == 0, info.stderr
    export = json.loads(info.stdout)["exports"][0]
    assert export["export-size"] == SIZE
    assert export["block_size_minimum"] == 4096  # the device's logical block size

    client = await RawNbd.connect(server.nbd_port)
    await client.open("lun@node1:1")
    # Sub-sector I/O would need a read-modify-write: refused, never done.
    assert (await client.call(Cmd.WRITE, 512, 512, b"x" * 512))[0] == NbdErrno.EINVAL
    data = os.urandom(65536)
    assert (await client.call(Cmd.WRITE, 8192, 65536, data, flags=CmdFlag.FUA))[0] == 0
    assert await client.call(Cmd.READ, 8192, 65536) == (0, data)
    assert (await client.call(Cmd.WRITE_ZEROES, 8192, 16384, flags=CmdFlag.NO_HOLE))[0] == 0
    assert (await client.call(Cmd.TRIM, 1 << 20, 1 << 20))[0] == 0
    assert (await client.call(Cmd.FLUSH))[0] == 0
    assert await client.call(Cmd.READ, 8192, 65536) == (0, bytes(16384) + data[16384:])
    await client.aclose()

    source = tmp_path / "source.img"
    source.write_bytes(os.urandom(SIZE))
    up = subprocess.run(
        ["nbdcopy", "--flush", str(source), server.uri("lun")], capture_output=True, timeout=60
    )
    assert up.returncode == 0, up.stderr
    with open(loop_device, "rb") as dev:
        assert dev.read() == source.read_bytes()


@pytest.mark.timeout(90)
async def test_two_servers_on_one_image_see_each_others_writes(start_blockd, tmp_path):
    image = make_image(tmp_path / "shared.img", SIZE)
    first = start_blockd({"lun": image}, workdir="first")
    second = start_blockd({"lun": image}, workdir="second")
    a = await RawNbd.connect(first.nbd_port)
    await a.open("lun@node1:1")
    b = await RawNbd.connect(second.nbd_port)
    await b.open("lun@node2:1")
    for round_ in range(20):
        offset = round_ * 65536
        data = os.urandom(65536)
        writer, reader = (a, b) if round_ % 2 == 0 else (b, a)
        # "write, get the reply, flush, get the reply, read" on different servers.
        assert (await writer.call(Cmd.WRITE, offset, 65536, data))[0] == 0
        assert (await writer.call(Cmd.FLUSH))[0] == 0
        assert await reader.call(Cmd.READ, offset, 65536) == (0, data)
    await a.aclose()
    await b.aclose()
