"""POSIX behaviour through a real mount: every operation of issue 3 item 2, called the
way programs call them (os.*, ctypes renameat2, setfacl), checked from user space."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import subprocess
import threading
from itertools import count
from pathlib import Path

import pytest

from .helpers import Mount

_dirs = count()
_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


@pytest.fixture
def d(shared_mount: Mount) -> Path:
    """A fresh directory of its own on the shared mount for each test."""
    path = shared_mount.mountpoint / f"t{next(_dirs)}"
    path.mkdir()
    return path


def renameat2(old: Path, new: Path, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, bytes(old), AT_FDCWD, bytes(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(old))


def assert_errno(err: int, func, *args) -> None:
    with pytest.raises(OSError) as info:
        func(*args)
    assert info.value.errno == err, f"{func.__name__}{args}: {info.value}"


@pytest.mark.timeout(60)
def test_create_write_read_and_attributes(d: Path) -> None:
    f = d / "file"
    fd = os.open(f, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o640)
    assert os.write(fd, b"hello world") == 11
    os.fsync(fd)
    assert os.pread(fd, 5, 6) == b"world"
    os.close(fd)
    st = os.stat(f)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_size == 11 and st.st_nlink == 1 and st.st_uid == os.getuid()
    assert_errno(errno.EEXIST, os.open, f, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    assert_errno(errno.ENOENT, os.stat, d / "missing")
    # O_APPEND and O_TRUNC go through the writeback cache and setattr(size).
    with open(f, "ab") as fh:
        fh.write(b"!")
    assert f.read_bytes() == b"hello world!"
    with open(f, "wb") as fh:
        fh.write(b"new")
    assert f.read_bytes() == b"new"
    # The inode number is stable across lookups and the directory sees the file.
    assert os.stat(f).st_ino == st.st_ino
    assert sorted(os.listdir(d)) == ["file"]


@pytest.mark.timeout(60)
def test_setattr_mode_owner_size_and_nanosecond_times(d: Path) -> None:
    f = d / "f"
    f.write_bytes(b"x" * 10000)
    os.chmod(f, 0o4751)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o4751
    os.chown(f, 1234, 5678)
    st = os.stat(f)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.truncate(f, 100)
    assert os.stat(f).st_size == 100 and f.read_bytes() == b"x" * 100
    os.truncate(f, 5000)
    assert f.read_bytes() == b"x" * 100 + bytes(4900)
    atime, mtime = 1_600_000_000_123_456_789, 1_500_000_000_987_654_321
    before = os.stat(f).st_ctime_ns
    os.utime(f, ns=(atime, mtime))
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (atime, mtime)
    assert st.st_ctime_ns >= before
    os.utime(f)  # UTIME_NOW for both
    assert os.stat(f).st_mtime_ns > mtime


@pytest.mark.timeout(60)
def test_mknod_fifo_devices_socket(d: Path) -> None:
    os.mkfifo(d / "fifo", 0o600)
    os.mknod(d / "chr", stat.S_IFCHR | 0o644, os.makedev(1, 3))
    os.mknod(d / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 42))
    os.mknod(d / "sock", stat.S_IFSOCK | 0o755)
    assert stat.S_ISFIFO(os.stat(d / "fifo").st_mode)
    st = os.stat(d / "chr")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    st = os.stat(d / "blk")
    assert stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(7, 42)
    assert stat.S_ISSOCK(os.stat(d / "sock").st_mode)
    # A fifo on the mount really is a fifo: data passes between two opens.
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append((d / "fifo").read_bytes()))
    reader.start()
    (d / "fifo").write_bytes(b"through the pipe")
    reader.join(10)
    assert got == [b"through the pipe"]


@pytest.mark.timeout(60)
def test_mkdir_rmdir_and_link_counts(d: Path) -> None:
    os.mkdir(d / "a", 0o750)
    st = os.stat(d / "a")
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o750 and st.st_nlink == 2
    parent_links = os.stat(d).st_nlink
    os.mkdir(d / "a" / "b")
    assert os.stat(d / "a").st_nlink == 3
    assert_errno(errno.ENOTEMPTY, os.rmdir, d / "a")
    assert_errno(errno.EEXIST, os.mkdir, d / "a")
    (d / "a" / "file").write_bytes(b"")
    assert_errno(errno.ENOTDIR, os.rmdir, d / "a" / "file")
    assert_errno(errno.EISDIR, os.unlink, d / "a" / "b")
    os.rmdir(d / "a" / "b")
    os.unlink(d / "a" / "file")
    os.rmdir(d / "a")
    assert os.stat(d).st_nlink == parent_links - 1
    assert os.listdir(d) == []


@pytest.mark.timeout(60)
def test_parent_times_change_on_create_and_remove(d: Path) -> None:
    os.utime(d, ns=(1_000_000_000, 1_000_000_000))
    (d / "f").write_bytes(b"")
    st = os.stat(d)
    assert st.st_mtime_ns > 1_000_000_000 and st.st_ctime_ns > 1_000_000_000
    os.utime(d, ns=(1_000_000_000, 1_000_000_000))
    os.unlink(d / "f")
    assert os.stat(d).st_mtime_ns > 1_000_000_000


@pytest.mark.timeout(60)
def test_link_symlink_readlink(d: Path) -> None:
    (d / "orig").write_bytes(b"shared data")
    os.link(d / "orig", d / "hard")
    assert os.stat(d / "orig").st_nlink == 2
    assert os.stat(d / "hard").st_ino == os.stat(d / "orig").st_ino
    (d / "hard").write_bytes(b"changed")
    assert (d / "orig").read_bytes() == b"changed"
    os.unlink(d / "orig")
    assert os.stat(d / "hard").st_nlink == 1 and (d / "hard").read_bytes() == b"changed"
    assert_errno(errno.EEXIST, os.link, d / "hard", d / "hard")
    os.mkdir(d / "dir")
    assert_errno(errno.EPERM, os.link, d / "dir", d / "dirlink")
    os.symlink("hard", d / "sym")
    assert os.readlink(d / "sym") == "hard"
    assert (d / "sym").read_bytes() == b"changed"
    assert stat.S_ISLNK(os.lstat(d / "sym").st_mode)
    long_target = "x/" * 1000 + "end"
    os.symlink(long_target, d / "longsym")
    assert os.readlink(d / "longsym") == long_target
    assert_errno(errno.EINVAL, os.readlink, d / "hard")


@pytest.mark.timeout(60)
def test_rename_plain_over_target_and_directories(d: Path) -> None:
    (d / "a").write_bytes(b"A")
    (d / "b").write_bytes(b"B")
    os.rename(d / "a", d / "c")
    assert not (d / "a").exists() and (d / "c").read_bytes() == b"A"
    os.rename(d / "c", d / "b")  # over an existing file
    assert sorted(os.listdir(d)) == ["b"] and (d / "b").read_bytes() == b"A"
    os.makedirs(d / "x" / "y")
    os.mkdir(d / "z")
    (d / "x" / "y" / "f").write_bytes(b"deep")
    os.rename(d / "x" / "y", d / "z" / "y")  # a directory changes parent
    assert (d / "z" / "y" / "f").read_bytes() == b"deep"
    assert os.stat(d / "x").st_nlink == 2 and os.stat(d / "z").st_nlink == 3
    assert os.stat(d / "z" / "y" / "..").st_ino == os.stat(d / "z").st_ino
    os.mkdir(d / "empty")
    os.rename(d / "empty", d / "x")  # over an empty directory
    assert_errno(errno.ENOTEMPTY, os.rename, d / "x", d / "z")
    assert_errno(errno.EINVAL, os.rename, d / "z", d / "z" / "y" / "inside")
    assert_errno(errno.ENOTDIR, os.rename, d / "z", d / "b")
    assert_errno(errno.EISDIR, os.rename, d / "b", d / "z")


@pytest.mark.timeout(60)
def test_rename_noreplace_and_exchange(d: Path) -> None:
    (d / "a").write_bytes(b"A")
    (d / "b").write_bytes(b"B")
    assert_errno(errno.EEXIST, renameat2, d / "a", d / "b", RENAME_NOREPLACE)
    renameat2(d / "a", d / "c", RENAME_NOREPLACE)
    assert (d / "c").read_bytes() == b"A"
    renameat2(d / "b", d / "c", RENAME_EXCHANGE)
    assert (d / "b").read_bytes() == b"A" and (d / "c").read_bytes() == b"B"
    os.mkdir(d / "dir")
    (d / "dir" / "inner").write_bytes(b"I")
    renameat2(d / "dir", d / "b", RENAME_EXCHANGE)  # a directory for a file
    assert (d / "b" / "inner").read_bytes() == b"I" and (d / "dir").read_bytes() == b"A"
    assert_errno(errno.ENOENT, renameat2, d / "b", d / "nothing", RENAME_EXCHANGE)


@pytest.mark.timeout(60)
def test_unlinked_while_open_stays_readable(d: Path) -> None:
    f = d / "f"
    f.write_bytes(b"still here")
    fd = os.open(f, os.O_RDWR)
    os.unlink(f)
    assert not f.exists()
    assert os.pread(fd, 100, 0) == b"still here"
    os.pwrite(fd, b"STILL", 0)
    os.fsync(fd)
    assert os.pread(fd, 100, 0) == b"STILL here"
    os.close(fd)


def test_unlinked_files_leave_syncfs_clean_and_fstat_working(d: Path) -> None:
    """The kernel flushes an unlinked inode's cached times with a SETATTR after the
    unlink freed it; an error there was kept and failed the next syncfs (ESTALE)."""
    for i in range(200):
        (d / f"f{i}").write_bytes(b"x" * 100)
    kept = os.open(d / "f0", os.O_RDONLY)
    try:
        for i in range(200):
            os.unlink(d / f"f{i}")
        assert os.fstat(kept).st_nlink == 0
    finally:
        os.close(kept)
    done = subprocess.run(["sync", "-f", str(d)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.timeout(60)
def test_sparse_files_and_holes(d: Path) -> None:
    f = d / "sparse"
    with open(f, "wb") as fh:
        fh.seek(10 << 30)  # 10 GiB: beyond height 2 with 4 KiB blocks
        fh.write(b"end")
        fh.seek(1 << 20)
        fh.write(b"middle")
    st = os.stat(f)
    assert st.st_size == (10 << 30) + 3
    assert st.st_blocks * 512 < 1 << 20  # the holes take no space
    with open(f, "rb") as fh:
        assert fh.read(4096) == bytes(4096)
        fh.seek((1 << 20) - 2)
        assert fh.read(10) == b"\0\0middle\0\0"
        fh.seek(10 << 30)
        assert fh.read() == b"end"
    os.truncate(f, 2 << 20)
    with open(f, "rb") as fh:
        fh.seek(1 << 20)
        assert fh.read(6) == b"middle"
    assert os.stat(f).st_size == 2 << 20


@pytest.mark.timeout(60)
def test_file_size_limit_and_huge_truncate_do_not_kill_the_mount(d: Path) -> None:
    f = d / "big"
    f.write_bytes(b"")
    # pjdfstest ftruncate/12 asks for ~1e15 bytes; beyond the format's limit is EFBIG.
    try:
        os.truncate(f, 999_999_999_999_999)
    except OSError as e:
        assert e.errno == errno.EFBIG
    else:
        assert os.stat(f).st_size == 999_999_999_999_999
    # GFS2's height limit with 4 KiB blocks lies beyond the kernel's own limit
    # (LLONG_MAX), so the largest size the kernel passes on must work, sparsely.
    os.truncate(f, (1 << 63) - 1)
    assert os.stat(f).st_size == (1 << 63) - 1 and os.stat(f).st_blocks < 64
    with open(f, "rb") as fh:
        fh.seek((1 << 62) + 12345)
        assert fh.read(100) == bytes(100)
    os.truncate(f, 0)
    assert_errno(errno.EINVAL, os.truncate, f, -1)
    (d / "after").write_bytes(b"alive")
    assert (d / "after").read_bytes() == b"alive"


@pytest.mark.timeout(60)
def test_name_limits(d: Path) -> None:
    name = "n" * 255
    (d / name).write_bytes(b"longest")
    assert (d / name).read_bytes() == b"longest" and os.listdir(d) == [name]
    too_long = "n" * 256
    for call in (
        lambda: os.close(os.open(d / too_long, os.O_CREAT | os.O_WRONLY)),
        lambda: os.mkdir(d / too_long),
        lambda: os.stat(d / too_long),
        lambda: os.rename(d / name, d / too_long),
        lambda: os.symlink("x", d / too_long),
    ):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.ENAMETOOLONG


@pytest.mark.timeout(60)
def test_xattrs_user_trusted_security_inline_and_unstuffed(d: Path) -> None:
    f = d / "f"
    f.write_bytes(b"")
    os.setxattr(f, "user.small", b"v1")
    os.setxattr(f, "trusted.t", b"trusted value")
    os.setxattr(f, "security.s", b"sec")
    big = bytes(range(256)) * 64  # 16 KiB: does not fit in one block
    os.setxattr(f, "user.big", big)
    assert os.getxattr(f, "user.small") == b"v1"
    assert os.getxattr(f, "user.big") == big
    assert set(os.listxattr(f)) >= {"user.small", "user.big", "trusted.t", "security.s"}
    assert_errno(errno.EEXIST, os.setxattr, f, "user.small", b"x", os.XATTR_CREATE)
    assert_errno(errno.ENODATA, os.setxattr, f, "user.none", b"x", os.XATTR_REPLACE)
    os.setxattr(f, "user.small", b"replaced", os.XATTR_REPLACE)
    assert os.getxattr(f, "user.small") == b"replaced"
    os.removexattr(f, "user.big")
    assert_errno(errno.ENODATA, os.getxattr, f, "user.big")
    # Many attributes spill out of the inline block.
    for i in range(200):
        os.setxattr(f, f"user.k{i:03d}", f"value {i}".encode() * 4)
    assert os.getxattr(f, "user.k199") == b"value 199" * 4
    assert len([n for n in os.listxattr(f) if n.startswith("user.k")]) == 200
    os.mkdir(d / "dir")
    os.setxattr(d / "dir", "user.on_dir", b"yes")
    assert os.getxattr(d / "dir", "user.on_dir") == b"yes"


@pytest.mark.timeout(60)
def test_posix_acls_with_setfacl(d: Path) -> None:
    setfacl, getfacl = shutil.which("setfacl"), shutil.which("getfacl")
    assert setfacl and getfacl, "the acl package (setfacl/getfacl) is needed"
    f = d / "f"
    f.write_bytes(b"")
    subprocess.run([setfacl, "-m", "u:1234:rw-,g:99:r--", str(f)], check=True, timeout=30)
    out = subprocess.run([getfacl, "-n", str(f)], capture_output=True, text=True, check=True)
    assert "user:1234:rw-" in out.stdout and "group:99:r--" in out.stdout
    assert "system.posix_acl_access" in os.listxattr(f)
    subprocess.run([setfacl, "-d", "-m", "u:55:rwx", str(d)], check=True, timeout=30)
    out = subprocess.run([getfacl, "-n", str(d)], capture_output=True, text=True, check=True)
    assert "default:user:55:rwx" in out.stdout
    subprocess.run([setfacl, "-b", str(f)], check=True, timeout=30)
    out = subprocess.run([getfacl, "-n", str(f)], capture_output=True, text=True, check=True)
    assert "user:1234" not in out.stdout and "group:99" not in out.stdout


@pytest.mark.timeout(60)
def test_statfs_reflects_allocation(d: Path) -> None:
    before = os.statvfs(d)
    assert before.f_namemax == 255 and before.f_bsize == 4096
    with open(d / "f", "wb") as fh:
        fh.write(os.urandom(8 << 20))
        os.fsync(fh.fileno())
    after = os.statvfs(d)
    assert before.f_bfree - after.f_bfree >= (8 << 20) // 4096
    assert after.f_files >= after.f_ffree


@pytest.mark.timeout(60)
def test_readdir_cookies_stable_while_directory_changes(d: Path) -> None:
    names = {f"entry{i:04d}" for i in range(3000)}
    for name in names:
        (d / name).write_bytes(b"")
    seen: list[str] = []
    removed: set[str] = set()
    added: set[str] = set()
    with os.scandir(d) as it:
        for i, entry in enumerate(it):
            seen.append(entry.name)
            if i % 100 == 0:  # change the directory in the middle of the listing
                victim = f"entry{(i * 7 + 13) % 3000:04d}"
                if victim not in removed and victim not in seen:
                    os.unlink(d / victim)
                    removed.add(victim)
                new = f"new{i:04d}"
                (d / new).write_bytes(b"")
                added.add(new)
    # Every entry present throughout appears exactly once; removed ones may or may
    # not appear, added ones may or may not appear; nothing appears twice.
    assert len(seen) == len(set(seen))
    untouched = names - removed
    assert untouched <= set(seen)
    assert set(seen) <= names | added
    assert set(os.listdir(d)) == (names - removed) | added


@pytest.mark.timeout(60)
def test_fsync_directory_and_durable_data(d: Path) -> None:
    data = os.urandom(3 << 20)
    with open(d / "f", "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fdatasync(fh.fileno())
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    assert (d / "f").read_bytes() == data


@pytest.mark.timeout(60)
def test_mmap_write_and_read(d: Path) -> None:
    import mmap

    f = d / "m"
    f.write_bytes(bytes(3 * 4096))
    with open(f, "r+b") as fh, mmap.mmap(fh.fileno(), 0) as mm:
        mm[4096:4101] = b"mmapd"
        mm.flush()
    assert f.read_bytes()[4096:4101] == b"mmapd"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_directory_of_50000_entries(d: Path) -> None:
    big = d / "big"
    big.mkdir()
    for i in range(50_000):  # mknod: one request per file, so the fs's work dominates
        os.mknod(big / f"file-with-a-longish-name-{i:06d}", stat.S_IFREG | 0o644)
    listing = os.listdir(big)
    assert len(listing) == 50_000 == len(set(listing))
    for i in range(0, 50_000, 997):
        assert os.stat(big / f"file-with-a-longish-name-{i:06d}").st_size == 0
    for i in range(0, 50_000, 5):
        os.unlink(big / f"file-with-a-longish-name-{i:06d}")
    assert len(os.listdir(big)) == 40_000
