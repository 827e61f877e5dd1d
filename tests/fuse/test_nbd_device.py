"""DEVICE may be an NBD URI: mount an image that nbdkit (a real NBD server) exports."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from .helpers import Mount, assert_clean, make_image


@pytest.mark.timeout(120)
def test_mount_over_nbdkit(tmp_path: Path, mounts: list[Mount]) -> None:
    image = make_image(tmp_path / "img", size_mib=256)
    sock, pidfile = tmp_path / "nbd.sock", tmp_path / "nbdkit.pid"
    server = subprocess.Popen(
        ["nbdkit", "-f", "-P", str(pidfile), "-U", str(sock), "file", str(image)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while not pidfile.exists() or not pidfile.read_text().strip():  # listening
            assert server.poll() is None, server.stderr.read().decode()
            assert time.monotonic() < deadline, "nbdkit did not start"
            time.sleep(0.05)
        m = Mount(f"nbd+unix:///?socket={sock}", tmp_path / "mnt")
        mounts.append(m)
        m.start()
        data = os.urandom(3 << 20)
        (m.mountpoint / "over-nbd").write_bytes(data)
        os.mkdir(m.mountpoint / "dir")
        assert (m.mountpoint / "over-nbd").read_bytes() == data
        assert "nbd+unix" in Path("/proc/self/mountinfo").read_text()
        assert m.unmount() == 0, m.log()
    finally:
        server.terminate()
        server.wait(timeout=20)
    assert_clean(image)
