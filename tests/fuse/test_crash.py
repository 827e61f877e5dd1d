"""Crash consistency: SIGKILL the daemon in the middle of a metadata-heavy workload,
then check the image the way an administrator would, over many trials."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .helpers import Mount, assert_clean, fsck_gfs2, make_image, reap_after_crash

WORKLOAD = Path(__file__).with_name("crash_workload.py")
TRIALS = 20


def fsck_y_then_n(image: Path, scratch: Path) -> None:
    """fsck.gfs2 -y replays gfspy's journal on a copy; -n must then find nothing."""
    copy = scratch / "copy.img"
    subprocess.run(["cp", "--sparse=always", str(image), str(copy)], check=True, timeout=60)
    fixed = subprocess.run(
        ["fsck.gfs2", "-y", str(copy)], capture_output=True, text=True, timeout=120
    )
    assert fixed.returncode in (0, 1), (
        f"fsck.gfs2 -y exit {fixed.returncode}: {fixed.stdout[-3000:]}"
    )
    rc, complaints = fsck_gfs2(copy)
    assert rc == 0 and not complaints, f"after fsck.gfs2 -y: {complaints[:20]}"
    copy.unlink()


@pytest.mark.slow
@pytest.mark.timeout(280)
def test_sigkill_during_metadata_workload(tmp_path: Path, mounts: list[Mount]) -> None:
    rng = random.Random(20261125)
    image = make_image(tmp_path / "crash.img", size_mib=256)
    durable_log = tmp_path / "durable.log"
    durable_log.touch()
    for trial in range(TRIALS):
        m = Mount(image, tmp_path / "mnt", options="commit=1")
        mounts.append(m)
        m.start()
        # Everything logged as durable so far must be there, intact.
        expected = dict(line.split() for line in durable_log.read_text().splitlines())
        for name, digest in expected.items():
            data = (m.mountpoint / "keep" / name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == digest, (
                f"trial {trial}: fsync'd file {name} differs after replay "
                f"({len(data)} bytes, starts {data[:24].hex()})"
            )
        workload = subprocess.Popen(
            [sys.executable, str(WORKLOAD), str(m.mountpoint), str(durable_log), str(trial)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            time.sleep(rng.uniform(0.2, 1.5))
            assert workload.poll() is None, workload.stderr.read().decode()[-3000:]
            m.kill()
        finally:
            reap_after_crash(workload, m.dev)
            m.cleanup()
        if trial % 5 == 0:
            fsck_y_then_n(image, tmp_path)
    # The last crash too must be replayed by gfspy at mount, and leave a clean image.
    m = Mount(image, tmp_path / "mnt", options="commit=1")
    mounts.append(m)
    m.start()
    expected = dict(line.split() for line in durable_log.read_text().splitlines())
    assert len(expected) >= TRIALS  # the workload did get fsyncs in before the kills
    assert set(expected) <= {p.name for p in (m.mountpoint / "keep").iterdir()}
    assert m.unmount() == 0, m.log()
    assert_clean(image)
    # The mounts after the kills found their journal dirty and replayed it (a kill
    # that lands before the workload's first commit may leave nothing to replay).
    replays = m.log_path.read_text(errors="replace").count("dirty, replaying")
    assert replays >= TRIALS - 2, f"{replays} replays after {TRIALS} crashes"


@pytest.mark.timeout(120)
def test_file_unlinked_while_open_is_freed_by_the_mount_after_a_crash(
    tmp_path: Path, mounts: list[Mount]
) -> None:
    image = make_image(tmp_path / "orphan.img", size_mib=256)
    m = Mount(image, tmp_path / "mnt")
    mounts.append(m)
    m.start()
    free_before = os.statvfs(m.mountpoint).f_bfree
    fd = os.open(m.mountpoint / "orphan", os.O_CREAT | os.O_RDWR)
    try:
        os.write(fd, os.urandom(16 << 20))
        os.fsync(fd)
        os.unlink(m.mountpoint / "orphan")
        os.fsync(fd)
        dir_fd = os.open(m.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dir_fd)  # the unlink (and the UNLINKED mark) is durable
        os.close(dir_fd)
        assert os.statvfs(m.mountpoint).f_bfree < free_before - (16 << 20) // 4096 + 16
        m.kill()  # the file is still open: only the next mount can free it
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    again = Mount(image, tmp_path / "mnt")
    mounts.append(again)
    again.start()
    assert os.listdir(again.mountpoint) == []
    assert os.statvfs(again.mountpoint).f_bfree >= free_before - 16
    assert again.unmount() == 0
    assert_clean(image)
