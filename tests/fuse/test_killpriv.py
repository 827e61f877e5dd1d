"""FUSE_HANDLE_KILLPRIV_V2: negotiated through gfspy's channel library, and honoured.

With the flag, the kernel stops asking for security.capability before every write
and leaves clearing set-id bits to gfspy; with -o nokillpriv the kernel does it. The
set-id rules must be the VFS's either way: a write or truncate by a caller without
CAP_FSETID clears set-user-ID, and set-group-ID when group-execute is set; chown of
a file clears them whoever does it; a root write keeps them; any write drops the
file capability. The unprivileged caller is uid/gid 1000 through setpriv, started in
the mount point (the pytest directories above it are root's alone).
"""

from __future__ import annotations

import errno
import os
import re
import stat
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gfspy.fuse.options import parse_options

from .helpers import Mount, assert_clean

USER = 1000
CAPABILITY = "security.capability"
MODES = ["killpriv", "nokillpriv"]
NEGOTIATED = "FUSE_HANDLE_KILLPRIV_V2 negotiated"
PROBES = re.compile(r"the kernel asked for security\.capability (\d+) times")


def file_capability() -> bytes:
    """A valid struct vfs_cap_data, revision 2: CAP_NET_RAW permitted and effective."""
    cap_net_raw = 13
    return struct.pack("<5I", 0x02000000 | 0x1, 1 << cap_net_raw, 0, 0, 0)


def has_capability(path: Path) -> bool:
    try:
        os.getxattr(path, CAPABILITY)
    except OSError as e:
        assert e.errno == errno.ENODATA, e
        return False
    return True


def as_user(mnt: Path, *cmd: str) -> None:
    """Run cmd as uid/gid 1000 with no supplementary groups, in the mount point."""
    drop = ["setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups"]
    proc = subprocess.run([*drop, *cmd], cwd=mnt, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{cmd}: {proc.stderr}"


def user_file(mnt: Path, name: str, mode: int, data: bytes = b"0123456789") -> Path:
    path = mnt / name
    path.write_bytes(data)
    os.chown(path, USER, USER)
    os.chmod(path, mode)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    return path


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def start(mount_image: Callable[..., Mount], mode: str, extra: str = "") -> Mount:
    options = "allow_other" + ("" if mode == "killpriv" else ",nokillpriv") + extra
    m = mount_image(options=options)
    # The daemon logs the outcome once INIT is answered, a moment after the mount.
    deadline = time.monotonic() + 30
    while "FUSE_HANDLE_KILLPRIV_V2" not in m.log_path.read_text(errors="replace"):
        assert time.monotonic() < deadline, m.log()
        time.sleep(0.05)
    negotiated = NEGOTIATED in m.log_path.read_text(errors="replace")
    assert negotiated == (mode == "killpriv"), m.log()
    return m


def remount_and_check(m: Mount, expected: dict[str, tuple[int, bytes]]) -> None:
    """The modes and contents are on disk, not only in the kernel's cache; the image
    passes both checkers."""
    assert m.unmount() == 0, m.log()
    assert_clean(Path(m.image))
    m.start()
    for name, (mode, data) in expected.items():
        path = m.mountpoint / name
        assert mode_of(path) == mode, f"{name}: {oct(mode_of(path))} after remount"
        assert path.read_bytes() == data, name


def test_option_parsing() -> None:
    assert parse_options([]).killpriv
    assert not parse_options(["rw,nokillpriv"]).killpriv
    assert parse_options(["nokillpriv", "killpriv"]).killpriv


@pytest.mark.timeout(180)
def test_small_writes_stop_probing_for_capabilities(
    mount_image: Callable[..., Mount],
) -> None:
    writes = 2000
    m = start(mount_image, "killpriv")
    path = m.mountpoint / "small"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        for i in range(writes):
            assert os.write(fd, bytes([i % 251]) * 512) == 512
        os.fsync(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"".join(bytes([i % 251]) * 512 for i in range(writes))
    assert m.unmount() == 0, m.log()
    probes = PROBES.findall(m.log_path.read_text(errors="replace"))
    assert probes, m.log()
    # One per attribute refresh at most (S_NOSEC latches), never one per write.
    assert int(probes[-1]) <= 10, m.log()


@pytest.mark.timeout(180)
def test_without_the_flag_every_write_probes(mount_image: Callable[..., Mount]) -> None:
    """The yardstick for the test above: libfuse's own trace counts the probes."""
    writes = 300
    m = start(mount_image, "nokillpriv", ",debug")
    fd = os.open(m.mountpoint / "small", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        for _ in range(writes):
            os.write(fd, b"x" * 512)
    finally:
        os.close(fd)
    assert m.unmount() == 0, m.log()
    trace = m.log_path.read_text(errors="replace")
    assert trace.count("opcode: GETXATTR") >= writes


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", MODES)
def test_write_kills_setid_bits_for_unprivileged_writers_only(
    mount_image: Callable[..., Mount], mode: str
) -> None:
    m = start(mount_image, mode)
    mnt = m.mountpoint
    # Set-user-ID and set-group-ID with group-execute: both go.
    user_file(mnt, "both", 0o6775)
    as_user(mnt, "sh", "-c", "printf abc >> both")
    assert mode_of(mnt / "both") == 0o775
    # Set-group-ID without group-execute marks mandatory locking: it stays.
    user_file(mnt, "sgid_nox", 0o2765)
    as_user(mnt, "sh", "-c", "printf abc >> sgid_nox")
    assert mode_of(mnt / "sgid_nox") == 0o2765
    user_file(mnt, "suid_only", 0o4755)
    as_user(mnt, "sh", "-c", "printf abc >> suid_only")
    assert mode_of(mnt / "suid_only") == 0o755
    # A direct write goes to the daemon straight away, with the kill flag every time.
    user_file(mnt, "direct", 0o6775, b"")
    as_user(mnt, "dd", "if=/dev/zero", "of=direct", "bs=4096", "count=3", "oflag=direct")
    assert mode_of(mnt / "direct") == 0o775
    # Root has CAP_FSETID: its writes keep both bits.
    user_file(mnt, "root", 0o6775)
    with open(mnt / "root", "ab") as f:
        f.write(b"abc")
    assert mode_of(mnt / "root") == 0o6775
    # The writes themselves landed.
    for name in ("both", "sgid_nox", "suid_only", "root"):
        assert (mnt / name).read_bytes() == b"0123456789abc", name
    assert (mnt / "direct").read_bytes() == bytes(3 * 4096)
    remount_and_check(
        m,
        {
            "both": (0o775, b"0123456789abc"),
            "sgid_nox": (0o2765, b"0123456789abc"),
            "suid_only": (0o755, b"0123456789abc"),
            "direct": (0o775, bytes(3 * 4096)),
            "root": (0o6775, b"0123456789abc"),
        },
    )


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", MODES)
def test_write_drops_the_file_capability(mount_image: Callable[..., Mount], mode: str) -> None:
    m = start(mount_image, mode)
    mnt = m.mountpoint
    for name in ("by_user", "by_root"):
        path = user_file(mnt, name, 0o755)
        os.setxattr(path, CAPABILITY, file_capability())
        assert os.getxattr(path, CAPABILITY) == file_capability()
    as_user(mnt, "sh", "-c", "printf abc >> by_user")
    with open(mnt / "by_root", "ab") as f:
        f.write(b"abc")
    for name in ("by_user", "by_root"):
        assert not has_capability(mnt / name), name
        assert (mnt / name).read_bytes() == b"0123456789abc", name
    # A capability set again after a write is seen, and dropped, by the next write.
    os.setxattr(mnt / "by_user", CAPABILITY, file_capability())
    as_user(mnt, "sh", "-c", "printf def >> by_user")
    assert not has_capability(mnt / "by_user")
    assert (mnt / "by_user").read_bytes() == b"0123456789abcdef"
    assert m.unmount() == 0, m.log()
    assert_clean(Path(m.image))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", MODES)
def test_chown_and_truncate_kill_setid_bits(mount_image: Callable[..., Mount], mode: str) -> None:
    m = start(mount_image, mode)
    mnt = m.mountpoint
    # chown of a file clears set-user-ID even when root does it.
    path = user_file(mnt, "chowned", 0o6775)
    os.chown(path, 0, 0)
    assert mode_of(path) == 0o775
    # The owner (root now) may set them again.
    os.chmod(path, 0o6775)
    assert mode_of(path) == 0o6775
    # chown of a directory leaves its set-group-ID (inheritance) alone.
    (mnt / "dir").mkdir()
    os.chmod(mnt / "dir", 0o2775)
    os.chown(mnt / "dir", USER, USER)
    assert mode_of(mnt / "dir") == 0o2775
    # truncate by a caller without CAP_FSETID clears both bits; by root, neither.
    user_file(mnt, "truncated", 0o6775)
    as_user(mnt, "truncate", "-s", "4", "truncated")
    assert mode_of(mnt / "truncated") == 0o775
    assert (mnt / "truncated").read_bytes() == b"0123"
    user_file(mnt, "root_truncated", 0o6775)
    os.truncate(mnt / "root_truncated", 4)
    assert mode_of(mnt / "root_truncated") == 0o6775
    remount_and_check(
        m,
        {
            "chowned": (0o6775, b"0123456789"),
            "truncated": (0o775, b"0123"),
            "root_truncated": (0o6775, b"0123"),
        },
    )


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", MODES)
def test_open_with_o_trunc_truncates_on_disk(mount_image: Callable[..., Mount], mode: str) -> None:
    """libfuse negotiates FUSE_ATOMIC_O_TRUNC, so the OPEN request is the truncate:
    the kernel's cache hides a missed one until the inode is read again."""
    m = start(mount_image, mode)
    path = m.mountpoint / "f"
    path.write_bytes(b"a long first version\n")
    with open(path, "wb") as f:
        f.write(b"short\n")
    assert path.read_bytes() == b"short\n"
    remount_and_check(m, {"f": (mode_of(path), b"short\n")})


@pytest.mark.timeout(180)
def test_open_with_o_trunc_by_unprivileged_kills_setid_bits(
    mount_image: Callable[..., Mount],
) -> None:
    """Only with the flag: without it the kernel drops the mode change of an atomic
    O_TRUNC open (see README, known limits)."""
    m = start(mount_image, "killpriv")
    mnt = m.mountpoint
    user_file(mnt, "user", 0o6775)
    as_user(mnt, "sh", "-c", "printf new > user")
    assert mode_of(mnt / "user") == 0o775
    user_file(mnt, "root", 0o6775)
    with open(mnt / "root", "wb") as f:
        f.write(b"new")
    assert mode_of(mnt / "root") == 0o6775
    remount_and_check(m, {"user": (0o775, b"new"), "root": (0o6775, b"new")})
