"""Extended attributes: the four namespaces, create/replace flags, inline and ED-block
values, and enough of them to need an EA indirect block."""

from __future__ import annotations

import errno
import os
import struct

import pytest

from gfspy.fs.api import XATTR_CREATE, XATTR_REPLACE, FsError
from gfspy.ondisk.constants import DIF_EA_INDIRECT

from .helpers import assert_clean, make_image, mounted, write_file


def _acl(*entries: tuple[int, int, int]) -> bytes:
    """A POSIX ACL xattr value: version 2, then (tag, perm, id) little-endian."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


NO_ID = 0xFFFFFFFF
# user::rwx user:1000:r-x group::r-- mask::r-x other::---  (needs storing)
ACL = _acl((1, 7, NO_ID), (2, 5, 1000), (4, 4, NO_ID), (0x10, 5, NO_ID), (0x20, 0, NO_ID))
# user::rw- group::r-- other::r--  (says no more than a mode: not stored)
MINIMAL_ACL = _acl((1, 6, NO_ID), (4, 4, NO_ID), (0x20, 4, NO_ID))


async def _errno_of(coro) -> int:
    with pytest.raises(FsError) as info:
        await coro
    return info.value.errno


@pytest.mark.timeout(60)
async def test_xattr_namespaces_flags_and_sizes(tmp_path):
    img = make_image(tmp_path / "fs.img", size_mib=64)
    values = {}
    async with mounted(img) as fs:
        ino = await write_file(fs, fs.root_ino, b"f", b"data")
        d = (await fs.mkdir(fs.root_ino, b"d", 0o755, 0, 0)).ino
        await fs.setxattr(ino, b"system.posix_acl_access", MINIMAL_ACL, 0)
        assert (await fs.getattr(ino)).mode & 0o777 == 0o644  # the mode took it all
        assert await _errno_of(fs.getxattr(ino, b"system.posix_acl_access")) == errno.ENODATA
        await fs.setxattr(ino, b"system.posix_acl_access", ACL, 0)
        assert (await fs.getattr(ino)).mode & 0o777 == 0o750  # owner, mask, other
        bad = ACL[:-8]  # no "other" entry
        assert await _errno_of(fs.setxattr(ino, b"system.posix_acl_access", bad, 0)) == (
            errno.EINVAL
        )
        await fs.setxattr(d, b"system.posix_acl_default", ACL, 0)
        # New entries inherit it: the mode and the default ACL restrict each other.
        child = await fs.create(d, b"child", 0o100666, 0, 0)
        assert child.mode & 0o777 == 0o640
        inherited = await fs.getxattr(child.ino, b"system.posix_acl_access")
        assert struct.unpack_from("<HHI", inherited, 4 + 8) == (2, 5, 1000)  # user:1000
        sub = await fs.mkdir(d, b"sub", 0o777, 0, 0)
        assert sub.mode & 0o777 == 0o750
        assert await fs.getxattr(sub.ino, b"system.posix_acl_default") == ACL
        assert await _errno_of(fs.setxattr(ino, b"system.posix_acl_default", ACL, 0)) == (
            errno.EACCES
        )
        await fs.setxattr(ino, b"security.selinux", b"system_u:object_r:tmp_t:s0\0", 0)
        await fs.setxattr(ino, b"trusted.overlay", b"y", 0)
        assert await _errno_of(fs.setxattr(ino, b"system.other", b"v", 0)) == errno.EOPNOTSUPP
        assert await _errno_of(fs.setxattr(ino, b"bogus.name", b"v", 0)) == errno.EOPNOTSUPP
        assert await _errno_of(fs.setxattr(ino, b"user.x", b"v", XATTR_REPLACE)) == errno.ENODATA
        await fs.setxattr(ino, b"user.x", b"v1", XATTR_CREATE)
        assert await _errno_of(fs.setxattr(ino, b"user.x", b"v2", XATTR_CREATE)) == errno.EEXIST
        await fs.setxattr(ino, b"user.x", b"v2", XATTR_REPLACE)
        assert await fs.getxattr(ino, b"user.x") == b"v2"
        assert await _errno_of(fs.getxattr(ino, b"user.none")) == errno.ENODATA
        assert await _errno_of(fs.setxattr(ino, b"user.big", bytes(65537), 0)) == errno.E2BIG
        await fs.setxattr(ino, b"user.max", b"m" * 65536, 0)  # 17 ED blocks
        # Many values: more than one EA block, so the inode goes EA_INDIRECT.
        for i in range(60):
            value = os.urandom(100 + i * 40)
            values[b"user.k%d" % i] = value
            await fs.setxattr(ino, b"user.k%d" % i, value, 0)
        assert fs.inodes[ino].di.flags & DIF_EA_INDIRECT
        for i in range(0, 60, 2):
            await fs.removexattr(ino, b"user.k%d" % i)
            del values[b"user.k%d" % i]
        assert await _errno_of(fs.removexattr(ino, b"user.k0")) == errno.ENODATA
        await fs.setxattr(ino, b"user.x", b"z" * 9000, 0)  # inline -> unstuffed
    async with mounted(img) as fs:
        ino = (await fs.lookup(fs.root_ino, b"f")).ino
        d = (await fs.lookup(fs.root_ino, b"d")).ino
        assert await fs.getxattr(ino, b"system.posix_acl_access") == ACL
        assert await fs.getxattr(d, b"system.posix_acl_default") == ACL
        assert await fs.getxattr(ino, b"user.max") == b"m" * 65536
        assert await fs.getxattr(ino, b"user.x") == b"z" * 9000
        for name, value in values.items():
            assert await fs.getxattr(ino, name) == value
        names = set(await fs.listxattr(ino))
        assert names == {
            b"system.posix_acl_access",
            b"security.selinux",
            b"trusted.overlay",
            b"user.x",
            b"user.max",
            *values,
        }
        await fs.unlink(fs.root_ino, b"f")  # frees every EA, ED and indirect block
    assert_clean(img)
