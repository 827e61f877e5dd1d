"""gfspy-mkfs on the other kinds of DEVICE: a real block device (a loop device) and an
NBD export served by nbdkit, both checked by fsck.gfs2; and the discard step that, as in
mkfs.gfs2, clears block devices and NBD exports first but never image files."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .oracle import MIB, fsck_complaints, gfspy_mkfs, sparse_image, tunegfs2_list

MARKER_OFFSET = 40 * MIB  # a free data block in every layout used here
MARKER = b"old data that a discard must remove" * 100


def _plant_marker(image: Path) -> None:
    with open(image, "r+b") as f:
        f.seek(MARKER_OFFSET)
        f.write(MARKER)


def _marker_present(image: Path) -> bool:
    with open(image, "rb") as f:
        f.seek(MARKER_OFFSET)
        return f.read(len(MARKER)) == MARKER


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Path]:
    """A loop device over a 64 MiB file in tmp_path (with old data planted at 40 MiB),
    detached afterwards."""
    backing = sparse_image(tmp_path / "loop.img", 64 * MIB)
    _plant_marker(backing)
    dev = subprocess.run(
        ["losetup", "--find", "--show", str(backing)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    try:
        yield Path(dev)
    finally:
        subprocess.run(["losetup", "--detach", dev], timeout=30, check=False)


@pytest.mark.timeout(90)
def test_block_device(loop_device: Path, tmp_path: Path) -> None:
    made = gfspy_mkfs("-p", "lock_dlm", "-t", "loop:fs", "-j", "2", str(loop_device))
    assert made.returncode == 0, made.stderr
    # Like mkfs.gfs2, the block device's old contents were discarded first.
    assert not _marker_present(tmp_path / "loop.img")
    assert "Device size:               0.06 GB (16384 blocks)" in made.stdout
    status, complaints = fsck_complaints(loop_device)
    assert status == 0 and complaints == [], complaints
    assert tunegfs2_list(loop_device)["Lock table"] == "loop:fs"
    # A second run without -O finds the filesystem on the block device and refuses.
    again = gfspy_mkfs("-p", "lock_nolock", str(loop_device))
    assert again.returncode == 1 and "existing gfs2" in again.stderr


@pytest.mark.timeout(90)
def test_K_keeps_old_contents(loop_device: Path, tmp_path: Path) -> None:
    made = gfspy_mkfs("-K", "-q", "-p", "lock_nolock", str(loop_device))
    assert made.returncode == 0, made.stderr
    assert _marker_present(tmp_path / "loop.img")
    status, complaints = fsck_complaints(loop_device)
    assert status == 0 and complaints == [], complaints


@pytest.mark.timeout(60)
def test_image_files_are_not_discarded(tmp_path: Path) -> None:
    image = sparse_image(tmp_path / "fs.img", 64 * MIB)
    _plant_marker(image)
    made = gfspy_mkfs("-q", "-p", "lock_nolock", str(image))
    assert made.returncode == 0, made.stderr
    assert _marker_present(image)


@pytest.fixture
def nbdkit_export(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """nbdkit serving a 128 MiB file on a Unix socket: (nbd+unix URI, backing file)."""
    backing = sparse_image(tmp_path / "export.img", 128 * MIB)
    _plant_marker(backing)
    sock, pidfile = tmp_path / "nbd.sock", tmp_path / "nbdkit.pid"
    proc = subprocess.Popen(
        ["nbdkit", "--foreground", "-P", str(pidfile), "--unix", str(sock), "file", str(backing)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while not pidfile.exists() or not pidfile.read_text().strip():  # listening
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else "nbdkit exited"
            assert time.monotonic() < deadline, "nbdkit did not create its socket"
            time.sleep(0.05)
        yield f"nbd+unix:///?socket={sock}", backing
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.timeout(90)
def test_nbd_export_served_by_nbdkit(nbdkit_export: tuple[str, Path]) -> None:
    uri, backing = nbdkit_export
    made = gfspy_mkfs("-p", "lock_dlm", "-t", "nbd:export", "-j", "2", uri)
    assert made.returncode == 0, made.stderr
    assert "Device size:               0.12 GB (32768 blocks)" in made.stdout
    assert not _marker_present(backing)  # NBD TRIM reached nbdkit's file
    status, complaints = fsck_complaints(backing)
    assert status == 0 and complaints == [], complaints
    assert tunegfs2_list(backing)["Lock table"] == "nbd:export"
