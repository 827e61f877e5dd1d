"""setattr/getattr: modes, owners, nanosecond times (NOW and before 1970), sizes,
special files and symlinks, all surviving a remount."""

from __future__ import annotations

import errno
import os
import stat
import time

import pytest

from gfspy.fs.api import NOW, FsError, SetAttr

from .helpers import assert_clean, make_image, mounted


@pytest.mark.timeout(30)
async def test_attributes_round_trip(tmp_path):
    img = make_image(tmp_path / "fs.img", size_mib=64)
    async with mounted(img) as fs:
        root = fs.root_ino
        f = await fs.create(root, b"f", 0o100640, 1000, 100)
        assert stat.S_ISREG(f.mode) and f.nlink == 1 and f.blocks == 8
        before = time.time_ns()
        attr = await fs.setattr(
            f.ino,
            SetAttr(mode=0o4755, uid=1, gid=2, atime_ns=-1_500_000_001, mtime_ns=NOW),
        )
        assert attr.mode == stat.S_IFREG | 0o4755 and (attr.uid, attr.gid) == (1, 2)
        assert attr.atime_ns == -1_500_000_001
        assert attr.mtime_ns >= before and attr.ctime_ns >= before
        atime = (await fs.getattr(f.ino)).atime_ns
        await fs.read(f.ino, 0, 1)  # relatime: atime older than mtime, so it moves
        assert (await fs.getattr(f.ino)).atime_ns > max(atime, before)
        atime = (await fs.getattr(f.ino)).atime_ns
        await fs.read(f.ino, 0, 1)  # and now it is recent: no write for this read
        assert (await fs.getattr(f.ino)).atime_ns == atime
        await fs.setattr(f.ino, SetAttr(size=10_000))  # a size change also sets mtime
        assert (await fs.getattr(f.ino)).mtime_ns >= before
        await fs.setattr(f.ino, SetAttr(mtime_ns=1_234_567_890_123_456_789))
        assert (await fs.getattr(f.ino)).size == 10_000
        assert await fs.read(f.ino, 9_990, 100) == bytes(10)
        await fs.setattr(f.ino, SetAttr(atime_ns=-1_500_000_001))

        dev = await fs.create(root, b"blk", stat.S_IFBLK | 0o600, 0, 6, rdev=os.makedev(8, 17))
        sock = await fs.create(root, b"sock", stat.S_IFSOCK | 0o777, 0, 0)
        link = await fs.symlink(root, b"link", b"target/path", 5, 5)
        assert stat.S_ISSOCK(sock.mode) and stat.S_ISLNK(link.mode) and link.size == 11
        with pytest.raises(FsError) as info:
            await fs.symlink(root, b"long", b"x" * 4096, 0, 0)
        assert info.value.errno == errno.ENAMETOOLONG
        with pytest.raises(FsError) as info:
            await fs.setattr(root, SetAttr(size=0))
        assert info.value.errno == errno.EISDIR
        with pytest.raises(FsError) as info:
            await fs.readlink(f.ino)
        assert info.value.errno == errno.EINVAL
    async with mounted(img) as fs:
        root = fs.root_ino
        attr = await fs.lookup(root, b"f")
        assert attr.mode == stat.S_IFREG | 0o4755 and attr.size == 10_000
        assert attr.atime_ns == -1_500_000_001
        assert attr.mtime_ns == 1_234_567_890_123_456_789
        assert (await fs.lookup(root, b"blk")).rdev == dev.rdev == os.makedev(8, 17)
        assert await fs.readlink((await fs.lookup(root, b"link")).ino) == b"target/path"
        st = await fs.statfs()
        assert st.bsize == 4096 and 0 < st.bfree < st.blocks and st.namemax == 255
    assert_clean(img)
