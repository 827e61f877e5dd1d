"""mount.gfspy as users and mount(8) run it: images from both mkfs tools, daemon mode,
options, clean unmount by signal, and bad input refused with one line and no write."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .helpers import MOUNT_CMD, REPO, Mount, assert_clean, fusermount_u, make_image


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def run_mount(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MOUNT_CMD, *args], capture_output=True, text=True, cwd=REPO, timeout=timeout
    )


def daemon_pid(mountpoint: Path) -> int:
    """The daemon serving mountpoint, found by its command line."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"gfspy.fuse" in argv and str(mountpoint).encode() in argv:
            return int(entry)
    raise AssertionError(f"no daemon found for {mountpoint}")


def wait_gone(pid: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                return
        except OSError:
            return
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}"), f"daemon {pid} still running"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tool", ["gfspy", "mkfs.gfs2"])
def test_images_from_both_mkfs_tools_mount_and_stay_clean(
    tmp_path: Path, mount_image, tool: str
) -> None:
    m = mount_image(tool=tool)
    root = m.mountpoint
    (root / "dir").mkdir()
    (root / "dir" / "file").write_bytes(b"data" * 10000)
    os.symlink("dir/file", root / "link")
    assert (root / "link").read_bytes() == b"data" * 10000
    assert m.unmount() == 0, m.log()
    assert_clean(m.image)
    # A second mount sees everything the first wrote.
    m2 = mount_image(m.image)
    assert (m2.mountpoint / "dir" / "file").read_bytes() == b"data" * 10000
    assert m2.unmount() == 0
    assert_clean(m.image)


@pytest.mark.timeout(120)
def test_daemon_mode_returns_when_ready_and_sigterm_unmounts_cleanly(tmp_path: Path) -> None:
    image = make_image(tmp_path / "img")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        # mount(8)'s calling convention: spec, dir, then -n and an -o list with its
        # own flags mixed in.
        result = run_mount(str(image), str(mnt), "-n", "-o", "rw,defaults,noatime,commit=5")
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        assert os.path.ismount(mnt)  # ready when the command returned
        (mnt / "f").write_bytes(b"written before SIGTERM")
        bdi = Path(f"/sys/class/bdi/{os.major(os.stat(mnt).st_dev)}:"
                   f"{os.minor(os.stat(mnt).st_dev)}/read_ahead_kb")  # fmt: skip
        assert bdi.read_text().strip() == "1024"
        assert "noatime" in Path("/proc/self/mountinfo").read_text()
        pid = daemon_pid(mnt)
        os.kill(pid, signal.SIGTERM)
        wait_gone(pid)
        assert not os.path.ismount(mnt)
    finally:
        if os.path.ismount(mnt) and not fusermount_u(mnt):
            fusermount_u(mnt, lazy=True)
    assert_clean(image)  # the clean-unmount header was written: no replay needed
    m = Mount(image, mnt).start()
    try:
        assert (mnt / "f").read_bytes() == b"written before SIGTERM"
    finally:
        assert m.unmount() == 0
        m.cleanup()


@pytest.mark.timeout(60)
def test_sigint_in_foreground_unmounts_cleanly(tmp_path: Path, mount_image) -> None:
    m = mount_image()
    (m.mountpoint / "f").write_bytes(b"x" * 100000)
    m.proc.send_signal(signal.SIGINT)
    assert m.proc.wait(timeout=30) == 0, m.log()
    m.proc = None
    assert not os.path.ismount(m.mountpoint)
    assert_clean(m.image)


@pytest.mark.timeout(60)
def test_read_only_mount_writes_nothing(tmp_path: Path, mount_image) -> None:
    m = mount_image()
    (m.mountpoint / "f").write_bytes(b"content")
    assert m.unmount() == 0
    before = digest(m.image)
    ro = mount_image(m.image, options="ro")
    assert (ro.mountpoint / "f").read_bytes() == b"content"
    with pytest.raises(OSError) as info:
        (ro.mountpoint / "g").write_bytes(b"")
    assert info.value.errno == 30  # EROFS
    assert ro.unmount() == 0
    assert digest(m.image) == before


@pytest.mark.timeout(60)
def test_a_second_mount_of_the_same_image_is_refused(tmp_path: Path, mount_image) -> None:
    """lock_nolock trusts that no one else uses the device: a second daemon on the
    same image, even read-only, would write or read under the first one's feet."""
    m = mount_image()
    (m.mountpoint / "f").write_bytes(b"content")
    for extra in ([], ["-o", "ro"]):
        other = tmp_path / f"other{len(extra)}"
        other.mkdir()
        done = run_mount(str(m.image), str(other), *extra)
        assert done.returncode == 32, done.stdout + done.stderr
        assert "in use by another gfspy mount" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
        assert not os.path.ismount(other)
    assert (m.mountpoint / "f").read_bytes() == b"content"
    assert m.unmount() == 0
    assert_clean(m.image)


@pytest.mark.timeout(60)
def test_lockproto_override_mounts_a_lock_dlm_image(tmp_path: Path, mount_image) -> None:
    image = make_image(tmp_path / "dlm.img", lockproto="lock_dlm")
    before = digest(image)
    mnt = tmp_path / "refused"
    mnt.mkdir()
    result = run_mount(str(image), str(mnt), "-f")
    assert result.returncode == 32
    assert len(result.stderr.splitlines()) == 1 and "lock_dlm" in result.stderr
    assert "Traceback" not in result.stderr
    assert digest(image) == before and not os.path.ismount(mnt)
    m = mount_image(image, options="lockproto=lock_nolock,hostdata=jid=0")
    (m.mountpoint / "f").write_bytes(b"ok")
    assert m.unmount() == 0
    assert_clean(image)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("daemon", [False, True], ids=["foreground", "daemon"])
def test_bad_devices_get_one_line_and_no_write(tmp_path: Path, daemon: bool) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    zeros = tmp_path / "zeros.img"
    zeros.write_bytes(bytes(64 << 20))
    text = tmp_path / "text.img"
    text.write_bytes(b"not a filesystem\n" * 1000000)
    corrupt = make_image(tmp_path / "corrupt.img", size_mib=256)
    with open(corrupt, "r+b") as f:  # the superblock's format number
        f.seek(0x10000 + 0x18)
        f.write((1234).to_bytes(4, "big"))
    for device in (zeros, text, corrupt, tmp_path / "missing.img"):
        before = digest(device) if device.exists() else None
        args = [str(device), str(mnt)] + (["-f"] if not daemon else [])
        result = run_mount(*args)
        assert result.returncode == 32, (device, result)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("mount.gfspy: "), result.stderr
        assert "Traceback" not in result.stderr
        assert not os.path.ismount(mnt)
        assert (digest(device) if device.exists() else None) == before


@pytest.mark.timeout(60)
def test_usage_errors_and_help(tmp_path: Path) -> None:
    image = make_image(tmp_path / "img", size_mib=256)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for args, code in (
        ([str(image), str(mnt), "-o", "bogus_option"], 1),
        ([str(image), str(mnt), "-o", "commit=soon"], 1),
        ([str(image), str(mnt), "-o", "errors=panic"], 1),
        ([str(image), str(mnt), "-o", "lockproto=lock_gulm"], 1),
        ([str(image), str(mnt), "-o", "hostdata=locktable=x"], 1),
        ([str(image)], 1),
        ([str(image), str(tmp_path / "nowhere")], 32),
        ([str(image), str(image)], 32),
    ):
        result = run_mount(*args)
        assert result.returncode == code, (args, result)
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert not os.path.ismount(mnt)
    help_text = run_mount("--help")
    assert help_text.returncode == 0
    for word in ("exit status", "lockproto=", "commit=", "errors=withdraw", "allow_other"):
        assert word in help_text.stdout


@pytest.mark.timeout(120)
def test_mount_t_gfspy_and_umount_through_mount8(tmp_path: Path) -> None:
    """mount(8) finds /sbin/mount.gfspy; a private mount namespace lets the test put
    one there (bind-mounted over /usr/sbin) without touching the machine."""
    image = make_image(tmp_path / "img", size_mib=256)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sbin = tmp_path / "sbin"
    sbin.mkdir()
    helper = sbin / "mount.gfspy"
    helper.write_text(f'#!/bin/sh\nexec {" ".join(MOUNT_CMD)} "$@"\n')
    helper.chmod(0o755)
    script = (
        f"mount --bind {sbin} /usr/sbin && "
        f"mount -t gfspy -o noatime,commit=5 {image} {mnt} && "
        f"grep -q '{mnt} fuse.gfspy' /proc/self/mounts && "
        f"echo through-mount8 > {mnt}/f && "
        f"umount {mnt}"
    )
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    deadline = time.monotonic() + 30  # the daemon finishes its clean unmount
    while any(str(image).encode() in p for p in _cmdlines()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert_clean(image)
    m = Mount(image, mnt).start()
    try:
        assert (mnt / "f").read_text() == "through-mount8\n"
    finally:
        assert m.unmount() == 0
        m.cleanup()


def _cmdlines() -> list[bytes]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                out.append(Path(f"/proc/{entry}/cmdline").read_bytes())
    return out
