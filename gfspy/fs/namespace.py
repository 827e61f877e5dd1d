"""Namespace operations of FileSystem: create, link, unlink, rmdir and rename.

Kept apart from filesystem.py only for size; it is a mixin over the same state and
relies on FileSystem's operation frame (`_op`), glocks and inode helpers.
"""

from __future__ import annotations

import errno
import stat
from typing import TYPE_CHECKING

from gfspy.fs.acl import ACCESS_ACL, DEFAULT_ACL, inherit_acl
from gfspy.fs.dirs import Found
from gfspy.fs.inode import Inode
from gfspy.fs.txn import FsTxn
from gfspy.fs.types import RENAME_EXCHANGE, RENAME_NOREPLACE, Attr, FsError
from gfspy.ondisk.constants import dt_from_mode
from gfspy.ondisk.errors import FormatError

if TYPE_CHECKING:
    from gfspy.fs.filesystem import FileSystem

    _Base = FileSystem
else:
    _Base = object

NAME_MAX = 255
_SPECIAL_TYPES = (stat.S_IFREG, stat.S_IFIFO, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFSOCK)


def check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG)
    if not name or b"/" in name or b"\0" in name:
        raise FsError(errno.EINVAL, f"bad name {name!r}")


class NamespaceOps(_Base):
    # ============================================================ namespace

    async def _insert_new(
        self,
        parent: int,
        name: bytes,
        mode: int,
        uid: int,
        gid: int,
        rdev: int = 0,
        target: bytes | None = None,
    ) -> Attr:
        check_name(name)
        async with self._op() as txn:
            dip = await self._dir(parent)
            await self._hold(txn, parent)
            if await self.dirs.lookup(dip, name) is not None:
                raise FsError(errno.EEXIST)
            await self._reserve(8)
            default_acl = await self._default_acl(dip)
            access_acl = None
            if default_acl is not None and not stat.S_ISLNK(mode):
                mode, access_acl = inherit_acl(default_acl, mode)
            ip = await self._new_inode(txn, dip, mode, uid, gid, rdev)
            if access_acl is not None:
                await self.xattrs.set(txn, ip, ACCESS_ACL, access_acl, 0)
            if default_acl is not None and stat.S_ISDIR(mode):
                await self.xattrs.set(txn, ip, DEFAULT_ACL, default_acl, 0)
            if target is not None:
                await self.files.write(txn, ip, 0, target)
            await self.dirs.add(txn, dip, name, ip.di.inum, dt_from_mode(mode))
            if ip.di.is_dir():
                dip.di.nlink += 1
            self._stamp(dip, txn, mtime=True)
            return self._attr(ip)

    async def _default_acl(self, dip: Inode) -> bytes | None:
        """The directory's default ACL, if it has one (new entries inherit it)."""
        if not dip.di.eattr:
            return None
        try:
            return await self.xattrs.get(dip, DEFAULT_ACL)
        except FsError as e:
            if e.errno == errno.ENODATA:
                return None
            raise

    async def create(
        self, parent: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0
    ) -> Attr:
        if stat.S_IFMT(mode) == 0:
            mode |= stat.S_IFREG
        if stat.S_IFMT(mode) not in _SPECIAL_TYPES:
            raise FsError(errno.EINVAL, f"create cannot make mode {mode:o}")
        return await self._insert_new(parent, name, mode, uid, gid, rdev)

    async def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Attr:
        return await self._insert_new(parent, name, stat.S_IFDIR | (mode & 0o7777), uid, gid)

    async def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Attr:
        if not target:
            raise FsError(errno.ENOENT)
        if len(target) >= self.geo.stuffed_size:
            raise FsError(errno.ENAMETOOLONG)
        return await self._insert_new(parent, name, stat.S_IFLNK | 0o777, uid, gid, target=target)

    async def link(self, ino: int, new_parent: int, new_name: bytes) -> Attr:
        check_name(new_name)
        async with self._op() as txn:
            dip = await self._dir(new_parent)
            await self._hold(txn, new_parent)
            await self._hold(txn, ino)
            ip = await self._inode(ino)
            if ip.di.is_dir():
                raise FsError(errno.EPERM)
            if ip.di.nlink == 0:
                raise FsError(errno.ENOENT)
            if ip.di.nlink >= 0xFFFFFFFF:
                raise FsError(errno.EMLINK)
            if await self.dirs.lookup(dip, new_name) is not None:
                raise FsError(errno.EEXIST)
            await self._reserve(2)
            await self.dirs.add(txn, dip, new_name, ip.di.inum, dt_from_mode(ip.di.mode))
            ip.di.nlink += 1
            self._stamp(ip, txn)
            self._stamp(dip, txn, mtime=True)
            return self._attr(ip)

    async def _remove(self, parent: int, name: bytes, want_dir: bool) -> None:
        check_name(name)
        async with self._op() as txn:
            dip = await self._dir(parent)
            await self._hold(txn, parent)
            if want_dir and name == b".":
                raise FsError(errno.EINVAL)
            if want_dir and name == b"..":
                raise FsError(errno.ENOTEMPTY)
            found = await self.dirs.lookup(dip, name)
            if found is None:
                raise FsError(errno.ENOENT)
            await self._hold(txn, found.dirent.inum.addr)
            ip = await self._inode(found.dirent.inum.addr)
            if want_dir:
                if not ip.di.is_dir():
                    raise FsError(errno.ENOTDIR)
                if ip.di.entries > 2:
                    raise FsError(errno.ENOTEMPTY)
            elif ip.di.is_dir():
                raise FsError(errno.EISDIR)
            await self._unlink_found(txn, dip, found, ip)

    async def _unlink_found(self, txn: FsTxn, dip: Inode, found: Found, ip: Inode) -> None:
        await self.dirs.remove(txn, dip, found)
        if ip.di.is_dir():
            dip.di.nlink -= 1
        self._stamp(dip, txn, mtime=True)
        await self._drop_link(txn, ip)

    async def unlink(self, parent: int, name: bytes) -> None:
        await self._remove(parent, name, want_dir=False)

    async def rmdir(self, parent: int, name: bytes) -> None:
        await self._remove(parent, name, want_dir=True)

    async def _is_ancestor(self, ancestor: int, ino: int) -> bool:
        """True if directory `ancestor` is `ino` or lies on its path to the root."""
        seen = 0
        while True:
            if ino == ancestor:
                return True
            if ino == self.root_ino:
                return False
            seen += 1
            if seen > 1 << 16:
                raise FormatError(f"'..' chain from {ino} does not reach the root")
            found = await self.dirs.lookup(await self._inode(ino), b"..")
            if found is None:
                raise FormatError(f"directory {ino} has no '..'")
            ino = found.dirent.inum.addr

    async def rename(
        self,
        old_parent: int,
        old_name: bytes,
        new_parent: int,
        new_name: bytes,
        flags: int = 0,
    ) -> None:
        check_name(old_name)
        check_name(new_name)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or (
            flags & RENAME_NOREPLACE and flags & RENAME_EXCHANGE
        ):
            raise FsError(errno.EINVAL)
        if old_name in (b".", b"..") or new_name in (b".", b".."):
            raise FsError(errno.EINVAL if old_name == b"." or new_name == b"." else errno.EBUSY)
        async with self._op() as txn:
            odp = await self._dir(old_parent)
            ndp = await self._dir(new_parent)
            for ino in sorted({old_parent, new_parent}):
                await self._hold(txn, ino)
            src = await self.dirs.lookup(odp, old_name)
            if src is None:
                raise FsError(errno.ENOENT)
            dst = await self.dirs.lookup(ndp, new_name)
            if dst is not None and flags & RENAME_NOREPLACE:
                raise FsError(errno.EEXIST)
            if dst is None and flags & RENAME_EXCHANGE:
                raise FsError(errno.ENOENT)
            sip = await self._inode(src.dirent.inum.addr)
            dip = await self._inode(dst.dirent.inum.addr) if dst is not None else None
            if dip is not None and dip.addr == sip.addr:
                return
            cross = old_parent != new_parent
            if sip.di.is_dir() and cross and await self._is_ancestor(sip.addr, new_parent):
                raise FsError(errno.EINVAL)
            if flags & RENAME_EXCHANGE:
                assert dip is not None and dst is not None
                if dip.di.is_dir() and cross and await self._is_ancestor(dip.addr, old_parent):
                    raise FsError(errno.EINVAL)
                await self._exchange(txn, odp, src, sip, ndp, dst, dip)
                return
            if dip is not None:
                if sip.di.is_dir():
                    if not dip.di.is_dir():
                        raise FsError(errno.ENOTDIR)
                    if dip.di.entries > 2:
                        raise FsError(errno.ENOTEMPTY)
                elif dip.di.is_dir():
                    raise FsError(errno.EISDIR)
            await self._reserve(4)
            await self._hold(txn, sip.addr)
            if dip is not None:
                assert dst is not None
                await self._hold(txn, dip.addr)
                await self._unlink_found(txn, ndp, dst, dip)
            src = await self.dirs.lookup(odp, old_name)
            assert src is not None
            await self.dirs.remove(txn, odp, src)
            await self.dirs.add(txn, ndp, new_name, sip.di.inum, dt_from_mode(sip.di.mode))
            if sip.di.is_dir() and cross:
                await self._set_dotdot(txn, sip, ndp)
                odp.di.nlink -= 1
                ndp.di.nlink += 1
            self._stamp(sip, txn)
            self._stamp(odp, txn, mtime=True)
            self._stamp(ndp, txn, mtime=True)

    async def _set_dotdot(self, txn: FsTxn, ip: Inode, parent: Inode) -> None:
        found = await self.dirs.lookup(ip, b"..")
        if found is None:
            raise FormatError(f"directory {ip.addr} has no '..'")
        await self.dirs.set_target(txn, ip, found, parent.di.inum, dt_from_mode(parent.di.mode))

    async def _exchange(
        self, txn: FsTxn, odp: Inode, src: Found, sip: Inode, ndp: Inode, dst: Found, dip: Inode
    ) -> None:
        await self._hold(txn, sip.addr)
        await self._hold(txn, dip.addr)
        await self.dirs.set_target(txn, odp, src, dip.di.inum, dt_from_mode(dip.di.mode))
        dst = await self.dirs.lookup(ndp, dst.dirent.name) or dst
        await self.dirs.set_target(txn, ndp, dst, sip.di.inum, dt_from_mode(sip.di.mode))
        if odp.addr != ndp.addr:
            if sip.di.is_dir():
                await self._set_dotdot(txn, sip, ndp)
                odp.di.nlink -= 1
                ndp.di.nlink += 1
            if dip.di.is_dir():
                await self._set_dotdot(txn, dip, odp)
                ndp.di.nlink -= 1
                odp.di.nlink += 1
        for ip in (sip, dip):
            self._stamp(ip, txn)
        self._stamp(odp, txn, mtime=True)
        self._stamp(ndp, txn, mtime=True)
