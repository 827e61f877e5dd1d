"""Our NBD client against real servers: nbdkit (memory, file, blocksize-policy) and qemu-nbd."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
import trio

from gfspy.blockdev.device import DeviceError, open_device
from gfspy.blockdev.nbd import NbdDevice, parse_nbd_uri
from gfspy.nbd.wire import TransmissionFlag

from .servers import REPO, make_image, start_nbdkit, start_qemu_nbd, stop, wait_port

MiB = 1 << 20


@pytest.fixture
def nbdkit_memory():
    proc, port = start_nbdkit("memory", "64M")
    yield f"nbd://127.0.0.1:{port}/"
    stop(proc)


@pytest.fixture
def nbdkit_file(tmp_path):
    image = make_image(tmp_path / "disk.img", 16 * MiB)
    proc, port = start_nbdkit("file", str(image))
    yield f"nbd://127.0.0.1:{port}/", image
    stop(proc)


@pytest.fixture
def qemu_nbd_file(tmp_path):
    image = make_image(tmp_path / "qdisk.img", 16 * MiB)
    proc, port = start_qemu_nbd(image)
    yield f"nbd://127.0.0.1:{port}/", image
    stop(proc)


async def exercise(dev, image_bytes=None) -> dict[int, bytes]:
    """Writes, FUA, concurrent I/O, flush, trim and zeroes; returns what must be on disk."""
    expected: dict[int, bytes] = {}
    a = os.urandom(3 * MiB)
    await dev.write(MiB, a)
    expected[MiB] = a
    assert await dev.read(MiB, len(a)) == a
    b = os.urandom(4096)
    await dev.write(0, b, fua=True)
    expected[0] = b

    # Many requests in flight on one connection, answered in any order.
    blocks = {off: os.urandom(65536) for off in range(8 * MiB, 12 * MiB, 65536)}
    async with trio.open_nursery() as nursery:
        for off, data in blocks.items():
            nursery.start_soon(dev.write, off, data)
    results: dict[int, bytes] = {}

    async def read_one(off: int) -> None:
        results[off] = await dev.read(off, 65536)

    async with trio.open_nursery() as nursery:
        for off in blocks:
            nursery.start_soon(read_one, off)
    assert results == blocks
    expected.update(blocks)
    await dev.flush()

    await dev.write_zeroes(MiB, MiB)
    assert await dev.read(MiB, MiB) == bytes(MiB)
    expected[MiB] = bytes(MiB) + a[MiB:]
    await dev.discard(12 * MiB, MiB)  # a hint: content afterwards is unspecified
    await dev.flush()
    return expected


def assert_image(image, expected: dict[int, bytes]) -> None:
    content = image.read_bytes()
    for off, data in expected.items():
        assert content[off : off + len(data)] == data, f"image differs at {off}"


@pytest.mark.timeout(60)
async def test_nbdkit_memory(nbdkit_memory):
    dev = await open_device(nbdkit_memory)
    try:
        assert isinstance(dev, NbdDevice)
        assert dev.size == 64 * MiB
        assert dev.can(TransmissionFlag.SEND_FUA)
        await exercise(dev)
        with pytest.raises(DeviceError) as e:
            await dev.read(dev.size - 512, 1024)
        assert e.value.errno == errno.EINVAL
    finally:
        await dev.aclose()


@pytest.mark.timeout(60)
async def test_nbdkit_file_data_lands_in_the_file(nbdkit_file):
    uri, image = nbdkit_file
    dev = await NbdDevice.open(uri)
    try:
        expected = await exercise(dev)
    finally:
        await dev.aclose()
    assert_image(image, expected)


@pytest.mark.timeout(60)
async def test_qemu_nbd_file_data_lands_in_the_file(qemu_nbd_file):
    uri, image = qemu_nbd_file
    dev = await NbdDevice.open(uri)
    try:
        expected = await exercise(dev)
    finally:
        await dev.aclose()
    assert_image(image, expected)


@pytest.mark.timeout(60)
async def test_block_size_limits_are_obeyed():
    proc, port = start_nbdkit(
        "--filter=blocksize-policy",
        "memory",
        "16M",
        "blocksize-minimum=4096",
        "blocksize-preferred=65536",
        "blocksize-maximum=1M",
        "blocksize-error-policy=error",
    )
    try:
        dev = await NbdDevice.open(f"nbd://127.0.0.1:{port}/")
        try:
            assert dev.block_size == 4096
            assert dev.props.max_payload == MiB
            data = os.urandom(5 * MiB)  # must be cut into <= 1 MiB requests
            await dev.write(4096, data)
            assert await dev.read(4096, len(data)) == data
            await dev.write_zeroes(8192, 3 * MiB)  # also cut into <= 1 MiB requests
            assert (
                await dev.read(4096, 3 * MiB + 8192)
                == data[:4096] + bytes(3 * MiB) + data[3 * MiB + 4096 : 3 * MiB + 8192]
            )
            await dev.discard(0, 4 * MiB)
            with pytest.raises(DeviceError) as e:
                await dev.read(512, 4096)  # unaligned for this export
            assert e.value.errno == errno.EINVAL
        finally:
            await dev.aclose()
    finally:
        stop(proc)


@pytest.mark.timeout(60)
async def test_reconnects_after_server_restart_and_refuses_a_changed_identity(tmp_path):
    image = make_image(tmp_path / "r.img", 8 * MiB)
    proc, port = start_nbdkit("file", str(image))
    uri = f"nbd://127.0.0.1:{port}/"
    dev = await NbdDevice.open(uri, io_timeout=5)
    try:
        await dev.write(0, b"1" * 4096)
        proc.kill()  # a crash, with our session still open
        proc.wait()
        proc = subprocess.Popen(
            [
                "nbdkit",
                "-f",
                "--exit-with-parent",
                "-i",
                "127.0.0.1",
                "-p",
                str(port),
                "file",
                str(image),
            ]
        )
        wait_port("127.0.0.1", port, proc)
        assert await dev.read(0, 4096) == b"1" * 4096  # read retried on a new session
        await dev.write(4096, b"2" * 4096)
        await dev.flush()
        proc.kill()
        proc.wait()
        # Same address, but a different device behind it: the client must refuse it.
        proc = subprocess.Popen(
            [
                "nbdkit",
                "-f",
                "--exit-with-parent",
                "-i",
                "127.0.0.1",
                "-p",
                str(port),
                "memory",
                "4M",
            ]
        )
        wait_port("127.0.0.1", port, proc)
        with pytest.raises(DeviceError, match="identity changed"):
            await dev.read(0, 4096)
    finally:
        await dev.aclose()
        stop(proc)
    assert image.read_bytes()[:8192] == b"1" * 4096 + b"2" * 4096


@pytest.mark.timeout(30)
async def test_unknown_export_and_dead_server_are_clean_errors():
    proc, port = start_qemu_nbd_named()
    try:
        with pytest.raises(DeviceError) as e:
            await NbdDevice.open(f"nbd://127.0.0.1:{port}/nosuch")
        assert e.value.errno == errno.ENOENT
    finally:
        stop(proc)
    with pytest.raises(DeviceError) as e:
        await NbdDevice.open(f"nbd://127.0.0.1:{port}/x", connect_timeout=5)
    assert e.value.errno == errno.ECONNREFUSED
    with pytest.raises(DeviceError) as e:
        await open_device("nbd:///nohost")
    assert e.value.errno == errno.EINVAL


def start_qemu_nbd_named():
    from .servers import free_port

    port = free_port()
    proc = subprocess.Popen(
        [
            "qemu-nbd",
            "--persistent",
            "-x",
            "known",
            "-f",
            "raw",
            "-b",
            "127.0.0.1",
            "-p",
            str(port),
            "/dev/null",
        ]
    )
    wait_port("127.0.0.1", port, proc)
    return proc, port


def test_uri_parsing():
    t = parse_nbd_uri("nbd://[::1]:10900/lun%200?control=[::1]:99&node=n3")
    assert (t.host, t.port, t.export, t.control, t.node) == (
        "::1",
        10900,
        "lun 0",
        "[::1]:99",
        "n3",
    )
    assert parse_nbd_uri("nbd://h/").port == 10809
    assert parse_nbd_uri("nbd+unix:///e?socket=/tmp/s").unix_socket == "/tmp/s"
    tls = parse_nbd_uri("nbds://h/e?tls-certificates=/etc/pki/gfspy")
    assert tls.tls and tls.tls_certificates == "/etc/pki/gfspy"
    assert not parse_nbd_uri("nbd://h/e?tls-certificates=/x").tls
    for bad in ("http://h/x", "nbd://h:99999/x", "nbd+unix:///e"):
        with pytest.raises(ValueError):
            parse_nbd_uri(bad)


@pytest.mark.timeout(120)
async def test_mkfs_over_nbd_then_fsck_is_clean(tmp_path):
    proc, port = start_nbdkit("memory", "256M")
    try:
        uri = f"nbd://127.0.0.1:{port}/"
        mkfs = await trio.run_process(
            [sys.executable, "-m", "gfspy.mkfs", "-O", "-q", "-p", "lock_dlm", "-t", "c1:fs1", "-j", "2", uri],
            cwd=REPO, capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip
        assert mkfs.returncode == 0, mkfs.stderr.decode()
        out = tmp_path / "copy.img"
        await trio.run_process(["nbdcopy", uri, str(out)])
    finally:
        stop(proc)
    fsck = await trio.run_process(
        ["fsck.gfs2", "-n", str(out)], capture_stdout=True, capture_stderr=True, check=False
    )
    assert fsck.returncode == 0, (fsck.stdout + fsck.stderr).decode()


@pytest.mark.timeout(60)
async def test_timeout_and_cancellation():
    proc, port = start_nbdkit("--filter=delay", "memory", "8M", "delay-read=3", "delay-write=3")
    try:
        # No control channel and the server stays up: the late write can never be shown
        # drained, so it fails with EIO and later writes are refused too.
        dev = await NbdDevice.open(f"nbd://127.0.0.1:{port}/", io_timeout=1, quiesce_timeout=1)
        try:
            conn = dev._conn
            with trio.move_on_after(0.2) as scope:
                await dev.read(0, 4096)
            assert scope.cancelled_caught
            assert not conn.broken  # a caller giving up does not kill the session
            with pytest.raises(DeviceError) as e:
                await dev.write(0, b"w" * 4096)  # no reply within io_timeout
            assert e.value.errno == errno.EIO and "in doubt" in e.value.strerror
            assert conn.broken  # the late reply can never be matched, so a new session
            with pytest.raises(DeviceError) as e:
                await dev.write(8192, b"v" * 4096)
            assert e.value.errno == errno.EIO and "writes stopped" in e.value.strerror
        finally:
            await dev.aclose()
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.timeout(60)
async def test_identity_is_declared_in_the_export_name(tmp_path):
    from gfspy.blockd.control_client import server_status
    from gfspy.blockdev.nbd import PROCESS_INCARNATION

    from .servers import Blockd

    server = Blockd(make_image(tmp_path / "i.img", MiB), tmp_path / "s").start()
    try:
        dev = await NbdDevice.open(server.uri("node42"))
        try:
            assert dev.wwid == server.wwid
            status = await server_status(server.control, timeout=10)
            (session,) = status["sessions"]
            assert session["node"] == "node42"
            assert int(session["incarnation"], 16) == PROCESS_INCARNATION
        finally:
            await dev.aclose()
    finally:
        server.stop()


@pytest.mark.timeout(60)
async def test_stalled_server_write_is_reissued_only_after_session_fence(tmp_path, caplog):
    """A frozen server (SIGSTOP) is the §3.7 hazard: its writes may still land later."""
    import signal

    from .servers import Blockd

    image = make_image(tmp_path / "s.img", 4 * MiB)
    server = Blockd(image, tmp_path / "s").start()
    try:
        dev = await NbdDevice.open(server.uri("n1"), io_timeout=1, quiesce_timeout=30)
        try:
            await dev.write(0, b"a" * 4096)
            server.proc.send_signal(signal.SIGSTOP)
            try:
                async with trio.open_nursery() as nursery:
                    for i in range(1, 5):
                        nursery.start_soon(dev.write, i * 4096, bytes([97 + i]) * 4096)
                    await trio.sleep(2.5)  # well past io_timeout: the writes are in doubt
                    server.proc.send_signal(signal.SIGCONT)
            finally:
                server.proc.send_signal(signal.SIGCONT)
            assert "SESSION_FENCE" in caplog.text and "confirmed" in caplog.text
            assert dev.write_poison is None
            await dev.write(5 * 4096, b"f" * 4096)
            await dev.flush()
        finally:
            await dev.aclose()
    finally:
        server.stop()
    want = b"".join(bytes([c]) * 4096 for c in b"abcdef")
    assert image.read_bytes()[: len(want)] == want


@pytest.mark.timeout(30)
async def test_unix_socket(tmp_path):
    sock, pidfile = tmp_path / "nbd.sock", tmp_path / "nbdkit.pid"
    # nbdkit writes its pidfile only once the socket is listening; the socket file alone
    # can exist before listen(), which made this test race.
    proc = subprocess.Popen(
        ["nbdkit", "-f", "--exit-with-parent", "-P", str(pidfile), "-U", str(sock), "memory", "1M"]
    )
    try:
        with trio.fail_after(10):
            while not pidfile.exists() or not pidfile.read_text().strip():
                await trio.sleep(0.05)
        dev = await open_device(f"nbd+unix:///?socket={sock}")
        try:
            await dev.write(512, b"u" * 512)
            assert await dev.read(0, 1024) == bytes(512) + b"u" * 512
        finally:
            await dev.aclose()
    finally:
        stop(proc)
