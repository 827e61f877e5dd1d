"""Extended-attribute operations of FileSystem, with the POSIX ACL side effects
(an access ACL sets the mode; default ACLs only on directories).

A mixin over FileSystem's state, split out for size; see filesystem.py.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from gfspy.fs.acl import ACCESS_ACL, DEFAULT_ACL, apply_access_acl, parse_acl
from gfspy.fs.types import FsError

if TYPE_CHECKING:
    from gfspy.fs.filesystem import FileSystem

    _Base = FileSystem
else:
    _Base = object


class XattrOps(_Base):
    async def getxattr(self, ino: int, name: bytes) -> bytes:
        async with self._op(write=False) as txn:
            await self._hold(txn, ino, shared=True)
            return await self.xattrs.get(await self._inode(ino), name)

    async def setxattr(self, ino: int, name: bytes, value: bytes, flags: int) -> None:
        async with self._op() as txn:
            await self._hold(txn, ino)
            ip = await self._inode(ino)
            await self._reserve(len(value) // self.geo.jbsize + 4)
            if name == ACCESS_ACL:
                mode, store = apply_access_acl(ip.di.mode, value)
                if mode != ip.di.mode and self.invalidate_callback is not None:
                    # The kernel cached the old mode and a setxattr reply cannot
                    # carry attributes: tell it (the callback only queues).
                    self.invalidate_callback(ino)
                ip.di.mode = mode
                self._stamp(ip, txn)
                if not store:  # the mode says it all: no xattr, as on Linux
                    try:
                        await self.xattrs.remove(txn, ip, name)
                    except FsError as e:
                        if e.errno != errno.ENODATA:
                            raise
                    return
            elif name == DEFAULT_ACL:
                if not ip.di.is_dir():
                    raise FsError(errno.EACCES, "default ACLs exist only on directories")
                parse_acl(value)
            await self.xattrs.set(txn, ip, name, value, flags)

    async def listxattr(self, ino: int) -> list[bytes]:
        async with self._op(write=False) as txn:
            await self._hold(txn, ino, shared=True)
            return await self.xattrs.list(await self._inode(ino))

    async def removexattr(self, ino: int, name: bytes) -> None:
        async with self._op() as txn:
            await self._hold(txn, ino)
            await self.xattrs.remove(txn, await self._inode(ino), name)
