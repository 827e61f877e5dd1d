"""The null pyfuse3 filesystem: the yardstick for what FUSE + pyfuse3 cost by themselves.

A directory tree kept in memory, writes discarded (only the size is kept), reads
return zeros. It is configured exactly like gfspy's adapter (writeback cache, long
timeouts, default_permissions), so a ratio against it measures gfspy's own work.

Usage: python -m gfspy.fuse.nullfs MOUNTPOINT   (foreground; unmount with
fusermount3 -u, or SIGTERM/SIGINT)
"""

from __future__ import annotations

import argparse
import errno
import itertools
import logging
import signal
import stat
import sys
import time

import pyfuse3
import trio

log = logging.getLogger(__name__)

TIMEOUT = 3600.0


class _Node:
    __slots__ = ("ino", "mode", "size", "nlink", "children", "target", "times")

    def __init__(self, ino: int, mode: int) -> None:
        self.ino = ino
        self.mode = mode
        self.size = 0
        self.nlink = 2 if stat.S_ISDIR(mode) else 1
        self.children: dict[bytes, _Node] | None = {} if stat.S_ISDIR(mode) else None
        self.target = b""
        self.times = time.time_ns()


class NullOperations(pyfuse3.Operations):
    """Just enough namespace for dd, tar x and create/stat/unlink loops."""

    supports_dot_lookup = True
    enable_writeback_cache = True

    def __init__(self) -> None:
        super().__init__()
        self._next_ino = itertools.count(pyfuse3.ROOT_INODE + 1)
        root = _Node(pyfuse3.ROOT_INODE, stat.S_IFDIR | 0o755)
        self.nodes: dict[int, _Node] = {root.ino: root}

    def _attr(self, node: _Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.st_mode = node.mode
        a.st_nlink = node.nlink
        a.st_size = node.size
        a.st_blksize = 4096
        a.st_blocks = (node.size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = node.times
        a.entry_timeout = a.attr_timeout = TIMEOUT
        return a

    def _dir(self, ino: int) -> dict[bytes, _Node]:
        children = self.nodes[ino].children
        if children is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return children

    def _new(self, parent: int, name: bytes, mode: int) -> _Node:
        children = self._dir(parent)
        if name in children:
            raise pyfuse3.FUSEError(errno.EEXIST)
        node = _Node(next(self._next_ino), mode)
        self.nodes[node.ino] = node
        children[name] = node
        return node

    async def lookup(self, parent_inode, name, ctx):
        if name == b".":
            return self._attr(self.nodes[parent_inode])
        node = self._dir(parent_inode).get(name)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(node)

    async def getattr(self, inode, ctx):
        return self._attr(self.nodes[inode])

    async def setattr(self, inode, attr, fields, fh, ctx):
        node = self.nodes[inode]
        if fields.update_size:
            node.size = attr.st_size
        if fields.update_mode:
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_mtime:
            node.times = attr.st_mtime_ns
        return self._attr(node)

    async def mkdir(self, parent_inode, name, mode, ctx):
        return self._attr(self._new(parent_inode, name, stat.S_IFDIR | mode))

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return self._attr(self._new(parent_inode, name, mode))

    async def create(self, parent_inode, name, mode, flags, ctx):
        node = self._new(parent_inode, name, mode)
        return pyfuse3.FileInfo(fh=node.ino), self._attr(node)

    async def symlink(self, parent_inode, name, target, ctx):
        node = self._new(parent_inode, name, stat.S_IFLNK | 0o777)
        node.target = target
        node.size = len(target)
        return self._attr(node)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        node = self.nodes[inode]
        self._dir(new_parent_inode)[new_name] = node
        node.nlink += 1
        return self._attr(node)

    async def readlink(self, inode, ctx):
        return self.nodes[inode].target

    async def _remove(self, parent_inode, name):
        node = self._dir(parent_inode).pop(name, None)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        node.nlink -= 1

    async def unlink(self, parent_inode, name, ctx):
        await self._remove(parent_inode, name)

    async def rmdir(self, parent_inode, name, ctx):
        await self._remove(parent_inode, name)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        node = self._dir(parent_inode_old).pop(name_old)
        self._dir(parent_inode_new)[name_new] = node

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode)

    async def read(self, fh, off, size):
        node = self.nodes[fh]
        return bytes(max(0, min(size, node.size - off)))

    async def write(self, fh, off, buf):
        node = self.nodes[fh]
        node.size = max(node.size, off + len(buf))
        return len(buf)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        entries = list(self._dir(fh).items())
        for index in range(start_id, len(entries)):
            name, node = entries[index]
            if not pyfuse3.readdir_reply(token, name, self._attr(node), index + 1):
                return

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = s.f_bfree = s.f_bavail = 1 << 30
        s.f_files = s.f_ffree = s.f_favail = 1 << 30
        s.f_namemax = 255
        return s


async def _serve(mountpoint: str) -> None:
    ops = NullOperations()
    pyfuse3.init(ops, mountpoint, set(pyfuse3.default_options) | {"fsname=nullfs"})
    try:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        pyfuse3.terminate()
                        return

            nursery.start_soon(stop_on_signal)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gfspy.fuse.nullfs",
        description="Serve an in-memory null filesystem (benchmark yardstick) in the foreground.",
        epilog="exit status: 0 after unmount, 1 on a mount error",
    )
    parser.add_argument("mountpoint")
    args = parser.parse_args(argv)
    try:
        trio.run(_serve, args.mountpoint)
    except RuntimeError as e:
        print(f"nullfs: {args.mountpoint}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
