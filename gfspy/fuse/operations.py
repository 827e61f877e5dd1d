"""The pyfuse3 adapter: translate kernel requests into gfspy.fs calls, nothing more.

Every handler is wrapped so that no exception can escape into pyfuse3's main loop
(any exception other than FUSEError ends the loop and leaves the mount returning
ENOTCONN). FsError becomes its errno, FsWithdrawn becomes EIO, and anything else
is logged with its traceback and becomes EIO.

The FUSE root is inode 1; gfspy inode numbers are dinode block addresses, and
block 1 can never hold a dinode (it lies inside the first 64 KiB that GFS2 leaves
unused), so mapping root <-> 1 cannot collide.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import reprlib
import stat
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pyfuse3
import trio

from gfspy.fs.api import NOW, Attr, FileSystem, FsError, FsWithdrawn, SetAttr
from gfspy.fuse import killpriv

log = logging.getLogger(__name__)

FUSE_ROOT = pyfuse3.ROOT_INODE
#: The node holds every lock for the whole mount (lock_nolock), so the kernel may
#: cache entries and attributes for as long as it likes; a glock demotion clears
#: them through invalidate_callback.
CACHE_TIMEOUT = 3600.0
#: Errno values the kernel should see unchanged; anything out of range is a bug.
_MAX_ERRNO = 4095

#: The kernel asks for this attribute before every write(2) to decide whether to
#: drop file capabilities (FUSE never marks inodes S_NOSEC), so answering "absent"
#: without a trip into the fs is what keeps small writes fast.
CAPABILITY_XATTR = b"security.capability"

_F = TypeVar("_F", bound=Callable[..., Awaitable[Any]])


def _brief(args: tuple[Any, ...]) -> str:
    """Request arguments for a log line: a write's megabyte of data is no help."""
    return ", ".join(reprlib.repr(a) for a in args)


def _shielded_from_errors(handler: _F) -> _F:
    """Turn every failure of `handler` into a FUSEError the kernel can be given."""

    @functools.wraps(handler)
    async def wrapper(self: GfspyOperations, *args: Any, **kwargs: Any) -> Any:
        try:
            return await handler(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except FsWithdrawn as e:
            log.debug("%s: withdrawn: %s", handler.__name__, e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except FsError as e:
            err = e.errno if e.errno and 0 < e.errno <= _MAX_ERRNO else errno.EIO
            raise pyfuse3.FUSEError(err) from None
        except Exception:  # noqa: BLE001 - the mount must survive any bug in a handler
            log.exception(
                "%s(%s) failed unexpectedly; returning EIO", handler.__name__, _brief(args)
            )
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


class GfspyOperations(pyfuse3.Operations):
    """pyfuse3 request handlers over one mounted gfspy FileSystem."""

    supports_dot_lookup = True
    enable_writeback_cache = True
    # Without FUSE_POSIX_ACL the kernel stores system.posix_acl_* as plain xattrs and
    # leaves permission checks to default_permissions on the mode bits; taking the
    # flag would also make us responsible for umask and default-ACL inheritance.
    enable_acl = False

    def __init__(self, fs: FileSystem) -> None:
        super().__init__()
        self.fs = fs
        #: The kernel's lookup count per gfspy inode: fs.forget only when it is zero.
        self.lookup_counts: dict[int, int] = {}
        #: Inodes known to have no security.capability (see CAPABILITY_XATTR);
        #: dropped on any change to that attribute, on forget and on invalidation.
        self.no_capability: set[int] = set()
        #: Set once the kernel's INIT has been answered (the mount is usable).
        self.initialized = trio.Event()
        self._invalidate_send, self._invalidate_receive = trio.open_memory_channel[int](
            float("inf")
        )
        fs.invalidate_callback = self._queue_invalidation

    # ---------------------------------------------------------------- mapping

    def _to_fs(self, ino: int) -> int:
        return self.fs.root_ino if ino == FUSE_ROOT else ino

    def _to_fuse(self, ino: int) -> int:
        return FUSE_ROOT if ino == self.fs.root_ino else ino

    def _entry(self, attr: Attr) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = self._to_fuse(attr.ino)
        entry.generation = attr.generation
        entry.entry_timeout = CACHE_TIMEOUT
        entry.attr_timeout = CACHE_TIMEOUT
        entry.st_mode = attr.mode
        entry.st_nlink = attr.nlink
        entry.st_uid = attr.uid
        entry.st_gid = attr.gid
        entry.st_rdev = attr.rdev
        entry.st_size = attr.size
        entry.st_blksize = attr.blksize
        entry.st_blocks = attr.blocks
        entry.st_atime_ns = attr.atime_ns
        entry.st_mtime_ns = attr.mtime_ns
        entry.st_ctime_ns = attr.ctime_ns
        return entry

    def _remember(self, attr: Attr) -> pyfuse3.EntryAttributes:
        """An entry handed to the kernel: it now holds one more lookup reference."""
        self.lookup_counts[attr.ino] = self.lookup_counts.get(attr.ino, 0) + 1
        return self._entry(attr)

    # ------------------------------------------------------ cache invalidation

    def _queue_invalidation(self, ino: int) -> None:
        """Called by the glock layer; must not block, so it only queues."""
        self.no_capability.discard(ino)
        if ino in self.lookup_counts or ino == self.fs.root_ino:
            self._invalidate_send.send_nowait(self._to_fuse(ino))

    async def run_invalidations(self) -> None:
        """Hand queued invalidations to one worker thread in batches (a thread hop per
        inode costs ~100 us; pyfuse3 calls may block on dirty pages, so never inline)."""
        async for first in self._invalidate_receive:
            batch = [first]
            while True:
                try:
                    batch.append(self._invalidate_receive.receive_nowait())
                except trio.WouldBlock:
                    break
            await trio.to_thread.run_sync(_invalidate_batch, batch)

    # -------------------------------------------------------------- lifecycle

    def init(self) -> None:
        self.initialized.set()

    # ------------------------------------------------------------- namespace

    @_shielded_from_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._to_fs(parent_inode)
        if name == b".":
            attr = await self.fs.getattr(parent)
        else:
            attr = await self.fs.lookup(parent, name)
        return self._remember(attr)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for fuse_ino, nlookup in inode_list:
            ino = self._to_fs(fuse_ino)
            remaining = self.lookup_counts.get(ino, 0) - nlookup
            if remaining > 0:
                self.lookup_counts[ino] = remaining
                continue
            self.lookup_counts.pop(ino, None)
            self.no_capability.discard(ino)
            try:
                await self.fs.forget(ino)
            except Exception:  # noqa: BLE001 - forget has no reply to carry an error
                log.exception("forget(%d) failed", ino)

    @_shielded_from_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(await self.fs.getattr(self._to_fs(inode)))

    @_shielded_from_errors
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        # Before any await: the kill bit is read from the request being served.
        kill = killpriv.request_kills_suidgid(killpriv.FUSE_SETATTR)
        ino = self._to_fs(inode)
        changes = SetAttr()
        if fields.update_mode:
            changes.mode = stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            changes.uid = attr.st_uid
        if fields.update_gid:
            changes.gid = attr.st_gid
        if fields.update_size:
            changes.size = attr.st_size
        if fields.update_atime:
            changes.atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            changes.mtime_ns = attr.st_mtime_ns
        if fields.update_ctime:
            changes.ctime_ns = attr.st_ctime_ns
        else:
            changes.ctime_ns = NOW
        if kill and not fields.update_mode:
            # chown of a non-directory, or truncate by a caller without CAP_FSETID:
            # the mode change goes in the same fs operation.
            changes.mode = await self._killed_mode(ino)
        attr = await self.fs.setattr(ino, changes)
        if kill and not stat.S_ISDIR(attr.mode):
            await self._drop_capability(ino)
        return self._entry(attr)

    @_shielded_from_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return await self.fs.readlink(self._to_fs(inode))

    @_shielded_from_errors
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        attr = await self.fs.create(
            self._to_fs(parent_inode), name, mode, ctx.uid, self._gid_for(parent_inode, ctx), rdev
        )
        return self._remember(attr)

    @_shielded_from_errors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        attr = await self.fs.mkdir(
            self._to_fs(parent_inode), name, mode, ctx.uid, self._gid_for(parent_inode, ctx)
        )
        return self._remember(attr)

    @_shielded_from_errors
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        attr = await self.fs.symlink(
            self._to_fs(parent_inode), name, target, ctx.uid, self._gid_for(parent_inode, ctx)
        )
        return self._remember(attr)

    @_shielded_from_errors
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        attr = await self.fs.link(self._to_fs(inode), self._to_fs(new_parent_inode), new_name)
        return self._remember(attr)

    @_shielded_from_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.unlink(self._to_fs(parent_inode), name)

    @_shielded_from_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.rmdir(self._to_fs(parent_inode), name)

    @_shielded_from_errors
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        # pyfuse3's RENAME_* values are the kernel's, and so are gfspy.fs's.
        await self.fs.rename(
            self._to_fs(parent_inode_old),
            name_old,
            self._to_fs(parent_inode_new),
            name_new,
            flags,
        )

    def _gid_for(self, parent_inode: int, ctx: pyfuse3.RequestContext) -> int:
        """New inodes take the caller's gid; set-gid directories are the fs's concern."""
        return ctx.gid

    # ------------------------------------------------------------------ files

    async def _kill_privs(self, ino: int) -> None:
        """What FUSE_HANDLE_KILLPRIV_V2 asks of a write: drop set-id bits as the VFS
        would, and any file capability."""
        killed = await self._killed_mode(ino)
        if killed is not None:
            await self.fs.setattr(ino, SetAttr(mode=killed, ctime_ns=NOW))
            await self._expire_kernel_attrs(ino)
        await self._drop_capability(ino)

    async def _killed_mode(self, ino: int) -> int | None:
        """The permission bits once set-id bits are killed, or None when there is
        nothing to kill (directories keep theirs)."""
        mode = (await self.fs.getattr(ino)).mode
        killed = killpriv.mode_after_kill(mode)
        if killed == mode or stat.S_ISDIR(mode):
            return None
        return stat.S_IMODE(killed)

    async def _expire_kernel_attrs(self, ino: int) -> None:
        """A WRITE or OPEN reply carries no attributes, and the kernel does not expect
        the mode to change under it, so its cached set-id bits would outlive the kill
        (for stat and for exec) until the attribute timeout. Expire them before
        replying; attributes only, which never waits on this request, in a thread."""
        await trio.to_thread.run_sync(_invalidate_attributes, self._to_fuse(ino))

    async def _drop_capability(self, ino: int) -> None:
        if ino in self.no_capability:
            return
        try:
            await self.fs.removexattr(ino, CAPABILITY_XATTR)
        except FsError as e:
            if e.errno != errno.ENODATA:
                raise
        self.no_capability.add(ino)

    @_shielded_from_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        # Before any await: the kill bit is read from the request being served.
        kill = killpriv.request_kills_suidgid(killpriv.FUSE_OPEN)
        ino = self._to_fs(inode)
        if flags & os.O_TRUNC:
            # libfuse negotiates FUSE_ATOMIC_O_TRUNC: the kernel sends no setattr
            # for open(O_TRUNC), truncating is ours (POSIX: and stamp m/ctime).
            changes = SetAttr(size=0, mtime_ns=NOW, ctime_ns=NOW)
            if kill:
                changes.mode = await self._killed_mode(ino)
            await self.fs.setattr(ino, changes)
            if changes.mode is not None:
                await self._expire_kernel_attrs(ino)
            if kill:
                await self._drop_capability(ino)
        await self.fs.open(ino)
        # One node holds every lock (lock_nolock): the page cache stays valid across
        # opens until a glock demotion invalidates it.
        return pyfuse3.FileInfo(fh=ino, keep_cache=True)

    @_shielded_from_errors
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        attr = await self.fs.create(
            self._to_fs(parent_inode), name, mode, ctx.uid, self._gid_for(parent_inode, ctx), 0
        )
        entry = self._remember(attr)
        await self.fs.open(attr.ino)
        return pyfuse3.FileInfo(fh=attr.ino, keep_cache=True), entry

    @_shielded_from_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.fs.read(fh, off, size)

    @_shielded_from_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        # Before any await: the kill bit is read from the request being served. Set
        # for writes through the kernel by a caller without CAP_FSETID (the kernel
        # writes through, not back, while the file has set-id bits).
        if killpriv.request_kills_suidgid(killpriv.FUSE_WRITE):
            await self._kill_privs(fh)
        return await self.fs.write(fh, off, buf)

    # No flush handler: close(2) is not a durability point in POSIX (fsync is), and
    # the kernel's writeback of the file's pages happens at close without one. The
    # default ENOSYS tells the kernel to stop sending FLUSH, a round trip per close.

    @_shielded_from_errors
    async def release(self, fh: int) -> None:
        await self.fs.release(fh)

    @_shielded_from_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.fs.fsync(fh, datasync)

    # ------------------------------------------------------------ directories

    @_shielded_from_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        ino = self._to_fs(inode)
        attr = await self.fs.getattr(ino)
        if not stat.S_ISDIR(attr.mode):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return ino

    @_shielded_from_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        cookie = start_id
        while True:
            batch = await self.fs.readdir(fh, cookie)
            if not batch:
                return
            for name, attr, next_cookie in batch:
                # Every entry is a readdirplus entry: the kernel takes a lookup
                # reference for each one it accepts, except "." and "..".
                if not pyfuse3.readdir_reply(token, name, self._entry(attr), next_cookie):
                    return
                if name not in (b".", b".."):
                    self.lookup_counts[attr.ino] = self.lookup_counts.get(attr.ino, 0) + 1
                cookie = next_cookie

    @_shielded_from_errors
    async def releasedir(self, fh: int) -> None:
        return None

    @_shielded_from_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.fs.fsync(fh, datasync)

    # ------------------------------------------------------------- filesystem

    @_shielded_from_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        info = await self.fs.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = info.bsize
        out.f_frsize = info.bsize
        out.f_blocks = info.blocks
        out.f_bfree = info.bfree
        out.f_bavail = info.bavail
        out.f_files = info.files
        out.f_ffree = info.ffree
        out.f_favail = info.ffree
        out.f_namemax = info.namemax
        return out

    # ----------------------------------------------------------------- xattrs

    @_shielded_from_errors
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        # pyfuse3 checks XATTR_CREATE/XATTR_REPLACE itself (with getxattr) before
        # calling us, and does not pass the flags on.
        ino = self._to_fs(inode)
        if name == CAPABILITY_XATTR:
            self.no_capability.discard(ino)
        await self.fs.setxattr(ino, name, value, 0)

    @_shielded_from_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        ino = self._to_fs(inode)
        if name != CAPABILITY_XATTR:
            return await self.fs.getxattr(ino, name)
        if ino in self.no_capability:
            raise pyfuse3.FUSEError(errno.ENODATA)
        try:
            return await self.fs.getxattr(ino, name)
        except FsError as e:
            if e.errno == errno.ENODATA:
                self.no_capability.add(ino)
            raise

    @_shielded_from_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return await self.fs.listxattr(self._to_fs(inode))

    @_shielded_from_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        ino = self._to_fs(inode)
        if name == CAPABILITY_XATTR:
            self.no_capability.discard(ino)
        await self.fs.removexattr(ino, name)


def _invalidate_attributes(fuse_ino: int) -> None:
    """Runs in a worker thread: expire the kernel's cached attributes of one inode."""
    try:
        pyfuse3.invalidate_inode(fuse_ino, attr_only=True)
    except OSError as e:
        if e.errno != errno.ENOENT:
            log.warning("invalidate_inode(%d, attr_only): %s", fuse_ino, os.strerror(e.errno or 0))


def _invalidate_batch(fuse_inos: list[int]) -> None:
    """Runs in a worker thread: drop the kernel's cached attributes and pages."""
    for ino in fuse_inos:
        try:
            pyfuse3.invalidate_inode(ino)
        except OSError as e:
            # ENOENT: the kernel already forgot the inode, which is what we wanted.
            if e.errno != errno.ENOENT:
                log.warning("invalidate_inode(%d): %s", ino, os.strerror(e.errno or 0))
