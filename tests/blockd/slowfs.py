"""A one-file FUSE filesystem whose writes block while a 'stall' file exists.

It stands in for a LUN whose I/O hangs in the kernel (an iSCSI session in recovery):
a write the server already dispatched stays inside pwritev until the test releases it.
Run as: python -m tests.blockd.slowfs MOUNTPOINT SIZE STALL_PATH
"""

from __future__ import annotations

import errno
import os
import stat
import sys

import pyfuse3
import trio

FILE_NAME = b"disk.img"
FILE_INODE = pyfuse3.ROOT_INODE + 1


class SlowFS(pyfuse3.Operations):
    def __init__(self, size: int, stall_path: str) -> None:
        super().__init__()
        self.data = bytearray(size)
        self.stall_path = stall_path

    async def getattr(self, inode, ctx=None):
        attrs = pyfuse3.EntryAttributes()
        if inode == pyfuse3.ROOT_INODE:
            attrs.st_mode = stat.S_IFDIR | 0o755
        elif inode == FILE_INODE:
            attrs.st_mode = stat.S_IFREG | 0o644
            attrs.st_size = len(self.data)
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attrs.st_ino = inode
        attrs.st_nlink = 1
        attrs.st_blksize = 4096
        attrs.entry_timeout = attrs.attr_timeout = 0
        return attrs

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode == pyfuse3.ROOT_INODE and name == FILE_NAME:
            return await self.getattr(FILE_INODE)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def open(self, inode, flags, ctx):
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return pyfuse3.FileInfo(fh=inode, direct_io=True)

    async def read(self, fh, off, size):
        return bytes(self.data[off : off + size])

    async def write(self, fh, off, buf):
        while os.path.exists(self.stall_path):
            await trio.sleep(0.02)
        self.data[off : off + len(buf)] = buf
        return len(buf)

    async def flush(self, fh):
        pass

    async def fsync(self, fh, datasync):
        pass

    async def release(self, fh):
        pass


def main() -> None:
    mountpoint, size, stall_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    options = set(pyfuse3.default_options)
    options.add("fsname=gfspy-test-slowfs")
    pyfuse3.init(SlowFS(size, stall_path), mountpoint, options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
