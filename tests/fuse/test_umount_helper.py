"""umount.gfspy: it returns only once the daemon has finished the clean unmount, umount(8)
runs it as /sbin/umount.fuse.gfspy, bad input changes nothing, and a dead daemon is
reported, not waited for."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gfspy.fuse.mount_record import (
    find_record,
    process_start,
    read_mountinfo,
    utab_has_entry,
)

from .helpers import MOUNT_CMD, REPO, Mount, assert_clean, fusermount_u, make_image

UMOUNT_CMD = [sys.executable, "-m", "gfspy.fuse.umount"]


def run_umount(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*UMOUNT_CMD, *args], capture_output=True, text=True, cwd=REPO, timeout=timeout
    )


def is_mounted(path: Path) -> bool:
    """From mountinfo, without touching the mount (its daemon may be dead)."""
    return any(e.mountpoint == str(path) for e in read_mountinfo())


def daemon_record(mountpoint: Path, timeout: float = 10) -> tuple[Path, dict]:
    """The record the daemon serving mountpoint wrote (a -f mount is visible a moment
    before its record is)."""
    deadline = time.monotonic() + timeout
    while True:
        entries = [e for e in read_mountinfo() if e.mountpoint == str(mountpoint)]
        found = find_record(entries[-1], [os.geteuid()]) if entries else None
        if found is not None:
            return found
        assert time.monotonic() < deadline, f"no daemon record for {mountpoint}"
        time.sleep(0.05)


@contextlib.contextmanager
def daemon_mount(image: Path, mnt: Path, options: str) -> Iterator[None]:
    """mount.gfspy in daemon mode; teardown unmounts whatever the test left."""
    mnt.mkdir(exist_ok=True)
    result = subprocess.run(
        [*MOUNT_CMD, str(image), str(mnt), "-o", options],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    try:
        yield
    finally:
        if is_mounted(mnt) and not fusermount_u(mnt):
            fusermount_u(mnt, lazy=True)


def write_dirty_state(root: Path) -> None:
    """200 MB of data and a few thousand files: with commit=3600 all of it is still
    to be flushed, and the clean unmount takes a while."""
    chunk = os.urandom(1 << 20)
    with open(root / "big", "wb") as f:
        for _ in range(200):
            f.write(chunk)
    for d in range(20):
        sub = root / f"d{d}"
        sub.mkdir()
        for i in range(150):
            (sub / f"f{i}").write_bytes(chunk[i : i + 3000])


@pytest.mark.timeout(300)
def test_returns_only_after_the_daemon_finished_and_the_image_is_clean(tmp_path: Path) -> None:
    image = make_image(tmp_path / "img", size_mib=1024)
    mnt = tmp_path / "mnt"
    with daemon_mount(image, mnt, "lockproto=lock_nolock,commit=3600"):
        write_dirty_state(mnt)
        path, record = daemon_record(mnt)
        pid = record["pid"]
        assert utab_has_entry(str(mnt))  # so that root's umount(8) runs the helper
        result = run_umount(str(mnt), "-v")
        # Checked at once: no waiting for anything after umount.gfspy returned.
        assert process_start(pid) is None, "umount.gfspy returned before the daemon exited"
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        assert "unmounted cleanly" in result.stdout and f"pid {pid}" in result.stdout
    assert_clean(image)
    assert not is_mounted(mnt)
    assert not path.exists()  # the outcome was read; the record is gone
    assert not utab_has_entry(str(mnt))
    m = Mount(image, mnt).start()
    try:
        assert (mnt / "big").stat().st_size == 200 << 20
        assert len(list((mnt / "d19").iterdir())) == 150
    finally:
        assert m.unmount() == 0
        m.cleanup()


@pytest.mark.timeout(180)
def test_umount8_runs_the_helper_and_waits(tmp_path: Path) -> None:
    """umount(8) finds /sbin/umount.fuse.gfspy; a private mount namespace lets the test
    put it there (bind-mounted over /usr/sbin) without touching the machine."""
    image = make_image(tmp_path / "img", size_mib=1024)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sbin = tmp_path / "sbin"
    sbin.mkdir()
    calls = tmp_path / "helper-calls"
    (sbin / "mount.gfspy").write_text(f'#!/bin/sh\nexec {" ".join(MOUNT_CMD)} "$@"\n')
    (sbin / "umount.fuse.gfspy").write_text(
        f'#!/bin/sh\necho "$@" >> {calls}\nexec {" ".join(UMOUNT_CMD)} "$@"\n'
    )
    for helper in sbin.iterdir():
        helper.chmod(0o755)
    script = (
        f"mount --bind {sbin} /usr/sbin && "
        f"mount -t gfspy -o lockproto=lock_nolock,commit=3600 {image} {mnt} && "
        f"dd if=/dev/urandom of={mnt}/big bs=1M count=200 status=none && "
        f"mkdir {mnt}/d && cd {mnt}/d && seq 3000 | xargs touch && cd / && "
        f"umount {mnt}"
    )
    try:
        result = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            capture_output=True, text=True, timeout=150, cwd=REPO,
        )  # fmt: skip
        # The daemon lived in the namespace; umount returned only once it had exited.
        assert _daemons_of(image) == []
    finally:
        _stop(_daemons_of(image))  # SIGTERM: the daemon unmounts in its own namespace
    assert result.returncode == 0, result.stderr
    assert calls.read_text().split() == [str(mnt)]  # the helper ran, with no flags
    assert_clean(image)
    assert not utab_has_entry(str(mnt))


@pytest.mark.timeout(120)
def test_bad_input_gets_one_line_and_unmounts_nothing(tmp_path: Path, mount_image) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    for args, code in (
        ([], 1),
        ([str(plain), "--bogus"], 1),
        ([str(plain), "--timeout", "soon"], 1),
        ([str(plain), "--timeout", "0"], 1),
        ([str(plain)], 32),
        ([str(tmp_path / "missing")], 32),
    ):
        result = run_umount(*args)
        assert result.returncode == code, (args, result)
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert result.stderr.startswith("umount.gfspy: ") and "Traceback" not in result.stderr
    # Another filesystem is left alone (a tmpfs in a private mount namespace).
    other = tmp_path / "tmpfs"
    other.mkdir()
    script = (
        f"mount -t tmpfs none {other} && {' '.join(UMOUNT_CMD)} {other}; "
        f"echo rc=$?; grep -c ' {other} ' /proc/self/mountinfo"
    )
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert result.stdout.split() == ["rc=32", "1"], result
    assert result.stderr.strip() == f"umount.gfspy: {other}: not a gfspy mount (tmpfs)"
    # A busy gfspy mount stays mounted and served.
    m = mount_image()
    (m.mountpoint / "f").write_bytes(b"kept")
    with open(m.mountpoint / "f", "rb"):
        result = run_umount(str(m.mountpoint))
        assert result.returncode == 32
        assert len(result.stderr.splitlines()) == 1 and "busy" in result.stderr
    assert (m.mountpoint / "f").read_bytes() == b"kept"
    help_text = run_umount("--help")
    assert help_text.returncode == 0
    for word in ("exit status", "umount.fuse.gfspy", "-l", "--timeout"):
        assert word in help_text.stdout
    assert m.unmount() == 0
    assert_clean(m.image)


@pytest.mark.timeout(120)
def test_a_killed_daemon_is_reported_not_waited_for(tmp_path: Path, mount_image) -> None:
    m = mount_image(options="commit=3600")
    (m.mountpoint / "f").write_bytes(b"x" * 100000)
    path, record = daemon_record(m.mountpoint)
    assert m.proc is not None and record["pid"] == m.proc.pid
    m.proc.send_signal(signal.SIGKILL)
    m.proc.wait(timeout=30)
    m.proc = None
    started = time.monotonic()
    result = run_umount(str(m.mountpoint), timeout=60)
    assert time.monotonic() - started < 30
    assert result.returncode == 32
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "died before finishing its clean unmount" in lines[0], lines
    assert not is_mounted(m.mountpoint)  # the dead mount is gone all the same
    assert not path.exists()
    assert not utab_has_entry(str(m.mountpoint))


@pytest.mark.timeout(120)
def test_lazy_detaches_at_once_and_the_daemon_finishes_after_the_last_close(
    tmp_path: Path,
) -> None:
    image = make_image(tmp_path / "img")
    mnt = tmp_path / "mnt"
    with daemon_mount(image, mnt, "lockproto=lock_nolock"):
        (mnt / "f").write_bytes(b"open across the detach")
        _, record = daemon_record(mnt)
        f = open(mnt / "f", "rb")  # noqa: SIM115 - held open across the unmount
        try:
            result = run_umount(str(mnt), "-l")
            assert result.returncode == 0, result.stderr
            assert not is_mounted(mnt)
            time.sleep(0.5)
            assert process_start(record["pid"]) == record["start_time"]  # still serving f
            assert f.read() == b"open across the detach"
        finally:
            f.close()
        deadline = time.monotonic() + 60
        while process_start(record["pid"]) is not None:
            assert time.monotonic() < deadline, "the daemon outlived the last close"
            time.sleep(0.05)
    assert_clean(image)


def _daemons_of(image: Path) -> list[int]:
    """Running mount.gfspy processes serving image, found by their command line."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                if b"gfspy.fuse" in argv and str(image).encode() in argv:
                    pids.append(int(entry))
    return pids


def _stop(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while any(process_start(pid) is not None for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
