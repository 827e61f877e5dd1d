"""Standard NBD clients (libnbd's nbdinfo and nbdcopy, qemu-img) against gfspy-blockd."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import trio

from gfspy.nbd.wire import Cmd, NbdErrno, TransmissionFlag

from .conftest import make_image
from .harness import RawNbd


def run(*cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


@pytest.mark.timeout(60)
def test_nbdinfo_reports_export_and_limits(start_blockd, tmp_path):
    server = start_blockd()
    result = run("nbdinfo", "--json", server.uri("disk"))
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    export = info["exports"][0]
    assert export["export-size"] == 64 * 1024 * 1024
    assert export["can_multi_conn"] is True
    assert export["can_flush"] is True and export["can_fua"] is True
    assert export["can_zero"] is True and export["can_trim"] is True
    assert export["is_read_only"] is False
    assert export["block_size_minimum"] in (512, 4096)
    assert "session=" in export["description"]
    # The default export ("" in the URI) is the first one named on the command line.
    assert run("nbdinfo", server.uri()).returncode == 0
    # An unknown export is refused cleanly and the server carries on.
    missing = run("nbdinfo", server.uri("nope"))
    assert missing.returncode != 0
    assert "No such file or directory" in missing.stderr
    assert server.alive()


@pytest.mark.timeout(60)
def test_nbdinfo_list_shows_every_export(start_blockd, tmp_path):
    server = start_blockd(
        {"alpha": make_image(tmp_path / "a.img"), "beta": make_image(tmp_path / "b.img", 1 << 20)},
        "--wwid",
        "beta=naa.600123",
    )
    result = run("nbdinfo", "--list", "--json", server.uri())
    assert result.returncode == 0, result.stderr
    exports = {e["export-name"]: e for e in json.loads(result.stdout)["exports"]}
    assert set(exports) == {"alpha", "beta"}
    assert exports["beta"]["export-size"] == 1 << 20
    assert "wwid=naa.600123" in exports["beta"]["description"]
    # The WWID is also accepted as the export name.
    by_wwid = run("nbdinfo", "--size", server.uri("naa.600123"))
    assert by_wwid.stdout.strip() == str(1 << 20)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("connections", [1, 4])
def test_nbdcopy_both_ways(start_blockd, tmp_path, connections):
    disk = make_image(tmp_path / "disk.img", 32 << 20)
    server = start_blockd({"disk": disk})
    source = random_file(tmp_path / "source.img", 32 << 20)
    up = run("nbdcopy", "--flush", f"--connections={connections}", str(source), server.uri("disk"))
    assert up.returncode == 0, up.stderr
    assert disk.read_bytes() == source.read_bytes()
    back = tmp_path / "back.img"
    down = run("nbdcopy", f"--connections={connections}", server.uri("disk"), str(back))
    assert down.returncode == 0, down.stderr
    assert back.read_bytes() == source.read_bytes()


@pytest.mark.timeout(90)
def test_qemu_img_info_and_convert_both_ways(start_blockd, tmp_path):
    disk = make_image(tmp_path / "disk.img", 16 << 20)
    server = start_blockd({"disk": disk})
    source = random_file(tmp_path / "source.img", 16 << 20)
    info = run("qemu-img", "info", "--output=json", server.uri("disk"))
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["virtual-size"] == 16 << 20
    up = run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), server.uri("disk"))
    assert up.returncode == 0, up.stderr
    assert disk.read_bytes() == source.read_bytes()
    back = tmp_path / "back.img"
    down = run("qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri("disk"), str(back))
    assert down.returncode == 0, down.stderr
    assert back.read_bytes() == source.read_bytes()


@pytest.mark.timeout(60)
async def test_read_only_export_refuses_writes(start_blockd, tmp_path):
    disk = make_image(tmp_path / "disk.img", 1 << 20)
    server = start_blockd({"disk": disk}, "--read-only")
    source = random_file(tmp_path / "source.img", 1 << 20)
    result = await trio.to_thread.run_sync(run, "nbdcopy", str(source), server.uri("disk"))
    assert result.returncode != 0  # libnbd sees READ_ONLY and refuses by itself
    # A client that ignores the flag gets EPERM from the server.
    client = await RawNbd.connect(server.nbd_port)
    await client.open("disk")
    assert client.flags & TransmissionFlag.READ_ONLY
    for cmd, payload in ((Cmd.WRITE, b"w" * 4096), (Cmd.TRIM, b""), (Cmd.WRITE_ZEROES, b"")):
        assert (await client.call(cmd, 0, 4096, payload))[0] == NbdErrno.EPERM
    assert await client.call(Cmd.READ, 0, 4096) == (0, bytes(4096))
    await client.aclose()
    assert disk.read_bytes() == bytes(1 << 20)


@pytest.mark.timeout(90)
def test_gfs2_image_survives_a_round_trip_through_the_server(start_blockd, tmp_path):
    """mkfs.gfs2 image -> qemu-img convert into the export -> nbdcopy out -> fsck.gfs2."""
    made = make_image(tmp_path / "made.img", 64 << 20)
    mkfs = run("mkfs.gfs2", "-O", "-p", "lock_nolock", "-j", "1", str(made))
    assert mkfs.returncode == 0, mkfs.stderr
    disk = make_image(tmp_path / "disk.img", 64 << 20)
    server = start_blockd({"disk": disk})
    up = run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(made), server.uri("disk"))
    assert up.returncode == 0, up.stderr
    back = tmp_path / "back.img"
    down = run("nbdcopy", server.uri("disk"), str(back))
    assert down.returncode == 0, down.stderr
    fsck = run("fsck.gfs2", "-n", str(back))
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert back.read_bytes() == made.read_bytes()
