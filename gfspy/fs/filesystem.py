"""FileSystem: the POSIX operations of mount.gfspy over the GFS2 layout.

Every operation runs under one mount-wide lock (trio tasks interleave at every
await, and the on-disk structures are shared), takes the glocks of the inodes it
touches, edits cached block images, and ends by handing one transaction to the
journal. A metadata inconsistency withdraws the mount: no more device I/O, EIO.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import stat
import time
from collections.abc import Callable

import trio

from gfspy.blockdev.device import Device, DeviceError
from gfspy.fs.alloc import Allocator, Rgrp
from gfspy.fs.bmap import BlockMap
from gfspy.fs.buffers import BufferCache
from gfspy.fs.dirs import Directories
from gfspy.fs.fileio import FileData
from gfspy.fs.inode import Inode
from gfspy.fs.mount import MountInfo, prepare
from gfspy.fs.namespace import NamespaceOps, check_name
from gfspy.fs.operation import Operation, release_holders
from gfspy.fs.txn import FsTxn
from gfspy.fs.types import (
    NOW,
    Attr,
    FsError,
    FsWithdrawn,
    SetAttr,
    StatFs,
)
from gfspy.fs.xattr_ops import XattrOps
from gfspy.fs.xattrs import Xattrs
from gfspy.glock.glock import (
    LM_ST_EXCLUSIVE,
    LM_ST_SHARED,
    LM_TYPE_INODE,
    LM_TYPE_RGRP,
    Glock,
    GlockOps,
    GlockTable,
)
from gfspy.glock.nolock import NoLock
from gfspy.journal.log import JournalError
from gfspy.journal.transaction import Transaction
from gfspy.ondisk.constants import (
    BLKST_DINODE,
    BLKST_UNLINKED,
    DIF_INHERIT_JDATA,
    DIF_JDATA,
    DIF_SYSTEM,
    DINODE_SIZE,
    FORMAT_DE,
)
from gfspy.ondisk.dinode import Dinode
from gfspy.ondisk.directory import new_stuffed_dir_payload
from gfspy.ondisk.errors import FormatError
from gfspy.ondisk.meta import Inum
from gfspy.ondisk.statfs import StatfsChange

log = logging.getLogger(__name__)

READDIR_BATCH = 512
RELATIME_SECONDS = 24 * 3600
#: Blocks kept back for metadata an operation may need (dinode, leaf splits, table
#: growth, indirect blocks) on top of what it asks for explicitly.
META_RESERVE = 64


def _split_ns(ns: int) -> tuple[int, int]:
    return divmod(ns, 1_000_000_000)


class _HybridMethod:
    """`FileSystem.open(device)` mounts, `fs.open(ino)` opens a file: one name, two roles.

    The API fixes both spellings, so the attribute dispatches on whether it is read
    from the class or from an instance.
    """

    def __init__(self, class_func: Callable, instance_func: Callable) -> None:
        self.class_func = class_func
        self.instance_func = instance_func

    def __get__(self, obj: object, owner: type) -> Callable:
        if obj is None:
            return self.class_func.__get__(owner, type(owner))
        return self.instance_func.__get__(obj, owner)


class FileSystem(NamespaceOps, XattrOps):
    """One mounted GFS2 filesystem on one journal."""

    def __init__(
        self, device: Device, info: MountInfo, *, jid: int, readonly: bool, commit_interval: float
    ) -> None:
        self.device = device
        self.info = info
        self.geo = info.geo
        self.bsize = info.geo.bsize
        self.jid = jid
        self.readonly = readonly
        self.commit_interval = commit_interval
        self.root_ino = info.sb.root_dir.addr
        self.journal = info.journal
        self.cache = BufferCache(device, self.bsize)
        self.cache.journal = self.journal
        self.alloc = Allocator(self.cache, info.rindex)
        self.alloc.on_use = self._hold_rgrp
        self.bmap = BlockMap(self.cache, self.alloc, self.geo)
        self.dirs = Directories(self.cache, self.alloc, self.bmap, self.geo)
        self.files = FileData(device, self.cache, self.alloc, self.bmap, self.geo)
        self.xattrs = Xattrs(self.cache, self.alloc, self.geo, info.sb.fs_format)
        self.inodes: dict[int, Inode] = {}
        self.glocks = GlockTable(
            NoLock(),
            {
                LM_TYPE_INODE: GlockOps("inode", self._inode_go_sync, self._inode_go_inval),
                LM_TYPE_RGRP: GlockOps("rgrp", self._rgrp_go_sync, self._rgrp_go_inval),
            },
        )
        #: Set by the FUSE layer: called with an inode number whose kernel cache must go.
        self.invalidate_callback: Callable[[int], None] | None = None
        self.withdrawn: str | None = None
        self._lock = trio.Lock()
        self._last_flush = time.monotonic()
        self._closed = False
        self._closing = trio.Event()  # wakes run_periodic_flush at unmount
        self._unmounting = False
        #: Files too big to free in one transaction, and the slice size that decides.
        self._deferred_frees: list[Inode] = []
        #: Dinode blocks this mount freed: their stale images must not be revived.
        self._dead_dinodes: set[int] = set()
        #: Last attributes of inodes freed while the kernel may still name them
        #: (until its FORGET): it flushes cached times of an unlinked inode with a
        #: SETATTR, and failing that would fail the next syncfs with ESTALE.
        self._ghosts: dict[int, Attr] = {}
        self.free_slice_blocks = (info.journal.journal_blocks if info.journal else 2048) * 512
        #: Changes of finished operations not yet handed to the journal: block ->
        #: True to log its cached image, False to revoke it (see `_commit`).
        self._staged: dict[int, bool] = {}
        self._staged_rgrps: set[Rgrp] = set()
        self._staged_statfs = [0, 0, 0]
        #: Staged blocks that trigger a push: a push must fit comfortably in half
        #: the log, which is when the journal flushes its running transaction.
        self._stage_limit = max(64, (info.journal.journal_blocks if info.journal else 2048) // 8)

    # ================================================================ mount

    async def _mount(
        cls,
        device: Device,
        *,
        jid: int = 0,
        readonly: bool = False,
        lockproto: str | None = None,
        commit_interval: float = 60.0,
    ) -> FileSystem:
        info = await prepare(device, jid=jid, readonly=readonly, lockproto=lockproto)
        fs = cls(device, info, jid=jid, readonly=readonly, commit_interval=commit_interval)
        try:
            await fs.alloc.load_all()
            if not readonly:
                await fs._free_orphans()
        except FormatError as e:
            raise FsError(errno.EIO, f"{device.name}: corrupt filesystem: {e}") from None
        log.info("%s: mounted, journal %d, root %d", device.name, jid, fs.root_ino)
        return fs

    async def _free_orphans(self) -> None:
        """Free inodes left UNLINKED by a crash while they were open."""
        orphans = await self.alloc.find_unlinked()
        for addr in orphans:
            async with self._op() as txn:
                ip = await self._inode(addr)
                await self._dealloc(txn, ip)
        if orphans:
            log.info("%s: freed %d unlinked inodes left by a crash", self.device.name, len(orphans))
            await self._flush()

    async def close(self) -> None:
        """Clean unmount: flush, fold statfs into the master file, UNMOUNT header."""
        if self._closed:
            return
        writable = not (self.withdrawn or self.readonly or self.journal is None)
        if writable:
            # Never leave UNLINKED dinodes on a clean image: files still open at
            # unmount after their last unlink are freed now.
            for ip in [ip for ip in self.inodes.values() if ip.unlinked and not ip.freed]:
                ip.open_count = 0
                async with self._op() as txn:
                    await self._dealloc(txn, ip)
        self._closed = True
        self._closing.set()
        if not writable or self.withdrawn:
            return
        assert self.journal is not None
        async with self._lock:
            await self._sync_locked()
            try:
                await self.journal.clean_unmount()
                self._unmounting = True  # everything is in place: demotions need no sync
                await self.glocks.aclose()
            except (JournalError, DeviceError) as e:
                self._withdraw(f"clean unmount failed: {e}")
        log.info("%s: unmounted cleanly", self.device.name)

    # ======================================================== operation frame

    def _withdraw(self, why: str) -> FsWithdrawn:
        if self.withdrawn is None:
            self.withdrawn = why
            log.error("%s: journal %d: withdrawn: %s", self.device.name, self.jid, why)
        return FsWithdrawn(why)

    def _check_alive(self, write: bool) -> None:
        if self.withdrawn is not None:
            raise FsWithdrawn(self.withdrawn)
        if self._closed:
            raise FsError(errno.EIO, "filesystem is unmounted")
        if write and self.readonly:
            raise FsError(errno.EROFS)

    def _op(self, write: bool = True) -> Operation:
        """`async with self._op() as txn:` frames one operation (see Operation)."""
        return Operation(self, write)

    async def _commit(self, txn: FsTxn) -> None:
        """Stage one finished operation's changes for the next log write.

        Nothing is copied yet: the cache keeps the newest image of every changed
        block (pinned until it is logged), and `_push_staged` turns all of them into
        one journal transaction when the log is flushed, so a burst of small
        operations pays for each block once instead of once per operation."""
        for rg in txn.rgrps:
            self._staged_rgrps.add(rg)
        for ip in txn.inodes:
            if ip.freed:
                continue
            buf = await self.cache.read(ip.addr)
            ip.di.pack_into(buf)
            txn.dirty.add(ip.addr)
        staged, pinned = self._staged, self.cache.pinned
        # Every freed block is revoked, data too: the journal keeps only revokes of
        # blocks with a copy in the live log, and a block that once held metadata
        # must not get that copy replayed over the data it holds next.
        for blkno in txn.revoke | txn.freed:
            staged[blkno] = False
            if blkno in pinned:
                pinned.discard(blkno)
                self.cache.drop(blkno)
        for blkno in txn.dirty - txn.freed:
            staged[blkno] = True
            pinned.add(blkno)
        delta = self._staged_statfs
        delta[0] += txn.statfs_total
        delta[1] += txn.statfs_free
        delta[2] += txn.statfs_dinodes
        if len(staged) > self._stage_limit:
            await self._push_staged()

    async def _push_staged(self) -> None:
        """Hand every staged change to the journal as one transaction (it becomes
        durable with the next flush). Called only between operations, so the cached
        images form a consistent state."""
        assert self.journal is not None
        staged = self._staged
        for rg in self._staged_rgrps:
            for blkno in self.alloc.write_images(rg):
                staged[blkno] = True
        self._staged_rgrps.clear()
        if not staged and not any(self._staged_statfs):
            return
        jt = Transaction(self.bsize)
        for blkno, logged in staged.items():
            if not logged:
                jt.revoke(blkno)
                continue
            buf = self.cache.cached(blkno)
            if buf is None:
                raise FormatError(f"changed block {blkno} left the cache before it was logged")
            jt.add_metadata(blkno, buf)
        jt.change_statfs(*self._staged_statfs)
        self._staged = {}
        self._staged_statfs = [0, 0, 0]
        self.cache.pinned.clear()
        await self.journal.add(jt)
        self.cache.trim()

    async def _flush(self) -> None:
        assert self.journal is not None
        await self._push_staged()
        await self.journal.flush()
        self.alloc.release_freed()
        self._last_flush = time.monotonic()

    async def _reserve(self, blocks: int) -> None:
        """ENOSPC before anything changes, so no operation stops half done. Called
        before the operation modifies anything, so flushing here is safe."""
        if self.alloc.available < blocks + META_RESERVE and self.alloc.pinned:
            await self._flush()  # blocks freed since the last flush become usable
        if self.alloc.available < blocks + META_RESERVE:
            raise FsError(errno.ENOSPC)

    async def _hold(
        self, txn: FsTxn, number: int, *, shared: bool = False, gl_type: int = LM_TYPE_INODE
    ) -> None:
        """Hold a glock for the rest of the operation (once per operation; a shared
        hold is upgraded by dropping it first, as a holder cannot wait on itself)."""
        state = LM_ST_SHARED if shared else LM_ST_EXCLUSIVE
        key = (gl_type, number)
        held = txn.held.get(key)
        if held is not None:
            if held.state == LM_ST_EXCLUSIVE or held.state == state:
                return
            held.glock.release(held)
            txn.holders.remove(held)
        holder = await self.glocks.get(gl_type, number).acquire(state)
        txn.holders.append(holder)
        txn.held[key] = holder

    async def _hold_rgrp(self, txn: FsTxn, rgrp_addr: int) -> None:
        await self._hold(txn, rgrp_addr, gl_type=LM_TYPE_RGRP)

    # ============================================================ glock hooks

    async def _inode_go_sync(self, glock: Glock) -> None:
        """Before another node may use the inode: its blocks in place, none left to
        replay. The mount does not track which blocks belong to which inode, so it
        checkpoints the whole log: a superset, and exact for what the lock guards."""
        if self.journal is not None and not self.withdrawn and not self._unmounting:
            await self._push_staged()
            await self.journal.checkpoint()
            self.alloc.release_freed()

    async def _inode_go_inval(self, glock: Glock) -> None:
        """After giving the lock up: nothing cached about the inode may be trusted.
        Its blocks are not tracked one by one, so the whole metadata cache goes (a
        superset; newer images of our own still come back from the journal)."""
        if self.journal is not None and not self.withdrawn and not self._unmounting:
            await self._push_staged()
        ip = self.inodes.get(glock.number)
        if ip is not None:
            ip.hash_table = None
            if ip.open_count == 0:
                del self.inodes[glock.number]
        self.cache.clear()
        if self.invalidate_callback is not None and not self._unmounting:
            try:
                self.invalidate_callback(glock.number)
            except Exception:  # noqa: BLE001 - the kernel cache is advisory here
                log.exception("inode %d: kernel cache invalidation failed", glock.number)

    async def _rgrp_go_sync(self, glock: Glock) -> None:
        if self.journal is not None and not self.withdrawn and not self._unmounting:
            await self._push_staged()
            await self.journal.checkpoint()
            self.alloc.release_freed()

    async def _rgrp_go_inval(self, glock: Glock) -> None:
        if self.journal is not None and not self.withdrawn and not self._unmounting:
            await self._push_staged()  # the staged header images come from these rgrps
        self.alloc.invalidate()

    # ================================================================ inodes

    async def _inode(self, ino: int) -> Inode:
        ip = self.inodes.get(ino)
        if ip is not None:
            return ip
        if self.alloc.rgrp_index_of(ino) is None:
            raise FsError(errno.ESTALE, f"inode {ino} is not a block any rgrp holds")
        if ino in self._dead_dinodes:
            # A dinode this mount freed keeps its old image until the block is
            # reused; bringing it back to life would log that image again, cancel
            # its revoke, and replay would then write the dead dinode over whatever
            # the block holds next (issue 3). Our own bitmap says whether it is.
            if await self.alloc.state(ino) not in (BLKST_DINODE, BLKST_UNLINKED):
                self.cache.drop(ino)
                raise FsError(errno.ESTALE, f"inode {ino} no longer exists")
            self._dead_dinodes.discard(ino)  # allocated again since: a new inode
        buf = await self.cache.read(ino)
        try:
            di = Dinode.unpack(buf)
        except FormatError:
            di = None
        if di is None or di.addr != ino:
            state = await self.alloc.state(ino)
            if state not in (BLKST_DINODE, BLKST_UNLINKED):
                # A stale inode number: its block was freed, perhaps reused for data.
                self.cache.drop(ino)
                raise FsError(errno.ESTALE, f"inode {ino} no longer exists")
            raise FormatError(f"block {ino} should be a dinode but is not")
        if not di.has_valid_type():
            raise FormatError(f"dinode {ino} has an invalid mode {di.mode:o}")
        if di.height > self.geo.max_height or di.depth > 17:
            raise FormatError(f"dinode {ino}: height {di.height} / depth {di.depth} too large")
        if di.height == 0 and di.size > self.geo.stuffed_size and not di.is_exhash():
            raise FormatError(f"dinode {ino}: stuffed but {di.size} bytes long")
        if di.blocks < 1:
            raise FormatError(f"dinode {ino}: block count {di.blocks}")
        ip = Inode(ino, di)
        self.inodes[ino] = ip
        return ip

    def _attr(self, ip: Inode) -> Attr:
        di = ip.di
        return Attr(
            ino=ip.addr,
            mode=di.mode,
            nlink=di.nlink,
            uid=di.uid,
            gid=di.gid,
            rdev=os.makedev(di.major, di.minor) if di.is_chr() or di.is_blk() else 0,
            size=di.size,
            blocks=di.blocks * (self.bsize // 512),
            atime_ns=di.atime * 1_000_000_000 + di.atime_nsec,
            mtime_ns=di.mtime * 1_000_000_000 + di.mtime_nsec,
            ctime_ns=di.ctime * 1_000_000_000 + di.ctime_nsec,
            generation=di.generation,
            blksize=self.bsize,
        )

    async def _dir(self, ino: int) -> Inode:
        ip = await self._inode(ino)
        if not ip.di.is_dir():
            raise FsError(errno.ENOTDIR)
        if ip.di.nlink == 0:
            raise FsError(errno.ENOENT, "directory was removed")
        return ip

    @staticmethod
    def _stamp(ip: Inode, txn: FsTxn, *, mtime: bool = False, atime: bool = False) -> None:
        sec, nsec = _split_ns(time.time_ns())
        ip.di.ctime, ip.di.ctime_nsec = sec, nsec
        if mtime:
            ip.di.mtime, ip.di.mtime_nsec = sec, nsec
        if atime:
            ip.di.atime, ip.di.atime_nsec = sec, nsec
        txn.inodes.add(ip)

    async def _new_inode(
        self, txn: FsTxn, parent: Inode, mode: int, uid: int, gid: int, rdev: int = 0
    ) -> Inode:
        if parent.di.mode & stat.S_ISGID:
            gid = parent.di.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        ((addr, _),) = await self.alloc.allocate(txn, 1, parent.addr + 1, dinode=True)
        gen = await self.alloc.next_generation(txn, addr)
        sec, nsec = _split_ns(time.time_ns())
        di = Dinode(
            formal=gen,
            addr=addr,
            mode=mode,
            uid=uid,
            gid=gid,
            nlink=1,
            atime=sec,
            mtime=sec,
            ctime=sec,
            atime_nsec=nsec,
            mtime_nsec=nsec,
            ctime_nsec=nsec,
            goal_meta=addr,
            goal_data=addr,
            generation=gen,
        )
        payload = b""
        inherit = parent.di.flags & DIF_INHERIT_JDATA
        if stat.S_ISDIR(mode):
            di.flags = DIF_JDATA | inherit
            di.nlink = 2
            di.size = self.geo.stuffed_size
            di.entries = 2
            di.payload_format = FORMAT_DE
            payload = new_stuffed_dir_payload(
                self.bsize, di.inum, Inum(parent.di.formal, parent.addr)
            )
        elif stat.S_ISREG(mode) and inherit:
            di.flags = DIF_JDATA
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            di.major, di.minor = os.major(rdev), os.minor(rdev)
        if parent.di.flags & DIF_SYSTEM:
            di.flags |= DIF_SYSTEM
        self.cache.new(addr, di.pack_block(self.bsize, payload))
        ip = Inode(addr, di)
        self.inodes[addr] = ip
        self._ghosts.pop(addr, None)
        txn.dirty.add(addr)
        txn.inodes.add(ip)
        await self._hold(txn, addr)
        return ip

    async def _dealloc(self, txn: FsTxn, ip: Inode) -> None:
        """Free an inode with no links and no opens: every block, then the dinode.

        A file too big to free in one transaction (its bitmap changes alone would
        not fit the log) is marked UNLINKED here and freed by `_free_deferred` in
        slices, each its own transaction; a crash in between leaves an UNLINKED
        orphan that the next mount finishes."""
        if not ip.di.is_dir() and ip.di.blocks > self.free_slice_blocks:
            if not ip.unlinked:
                await self.alloc.set_unlinked(txn, ip.addr, True)
                ip.unlinked = True
            self._deferred_frees.append(ip)
            return
        if ip.di.is_dir():
            await self.dirs.free_all(txn, ip)
        elif ip.di.height:
            await self.bmap.truncate(txn, ip, 0, metadata_data=False)
        await self.xattrs.free_all(txn, ip)
        if ip.di.blocks != 1:
            raise FormatError(f"inode {ip.addr}: {ip.di.blocks} blocks counted after freeing all")
        await self.alloc.free(txn, [], dinode=ip.addr)
        txn.revoke.add(ip.addr)
        ip.freed = True
        self._dead_dinodes.add(ip.addr)
        self.inodes.pop(ip.addr, None)
        self.cache.drop(ip.addr)
        self.glocks.forget(LM_TYPE_INODE, ip.addr)
        self._ghosts[ip.addr] = dataclasses.replace(self._attr(ip), nlink=0, size=0, blocks=0)

    async def _free_deferred(self, ip: Inode) -> None:
        """Free a big unlinked file a slice of logical blocks at a time."""
        bs = self.bsize
        end = -(-ip.di.size // bs)
        while ip.di.height and ip.di.blocks > self.free_slice_blocks:
            end = max(0, end - self.free_slice_blocks)
            txn = FsTxn()
            try:
                await self.bmap.truncate(txn, ip, end, metadata_data=False)
                await self._commit(txn)
            finally:
                release_holders(txn)
            if end == 0:
                break
        txn = FsTxn()
        try:
            await self._dealloc(txn, ip)
            await self._commit(txn)
        finally:
            release_holders(txn)

    async def _shrink_in_slices(self, ip: Inode, size: int) -> None:
        """Cut a big file down from the end, one transaction per slice, so no single
        transaction outgrows the log. Each slice leaves a consistent, shorter file."""
        bs = self.bsize
        end = -(-ip.di.size // bs)
        target = -(-size // bs)
        while ip.di.blocks > self.free_slice_blocks and end > target:
            end = max(target, end - self.free_slice_blocks)
            txn = FsTxn()
            try:
                await self.files.truncate(txn, ip, max(size, end * bs))
                await self._commit(txn)
            finally:
                release_holders(txn)

    async def _drop_link(self, txn: FsTxn, ip: Inode) -> None:
        ip.di.nlink -= 1 if not ip.di.is_dir() else ip.di.nlink
        self._stamp(ip, txn)
        if ip.di.nlink > 0:
            return
        if ip.open_count > 0:
            await self.alloc.set_unlinked(txn, ip.addr, True)
            ip.unlinked = True
        else:
            await self._dealloc(txn, ip)

    # ============================================================ queries

    async def sync(self) -> None:
        self._check_alive(False)
        if self.readonly:
            return
        async with self._lock:
            await self._sync_locked()

    async def _sync_locked(self) -> None:
        """Flush, fold this node's statfs deltas into the master file, checkpoint."""
        assert self.journal is not None
        try:
            await self._flush()
            local = list(self.journal.statfs_local)
            if any(local):
                txn = FsTxn()
                addr = self.info.master_statfs
                buf = await self.cache.read(addr)
                master = StatfsChange.unpack(buf, DINODE_SIZE)
                folded = master + StatfsChange(*local)
                buf[DINODE_SIZE : DINODE_SIZE + StatfsChange.SIZE] = folded.pack()
                txn.dirty.add(addr)
                txn.statfs_total, txn.statfs_free, txn.statfs_dinodes = (-v for v in local)
                await self._commit(txn)
                await self._flush()
            await self.journal.checkpoint()
        except (JournalError, DeviceError, FormatError) as e:
            raise self._withdraw(f"sync failed: {e}") from e

    async def statfs(self) -> StatFs:
        self._check_alive(False)
        total, free = sum(e.data for e in self.alloc.entries), self.alloc.free_total
        dinodes = 0
        for index in range(len(self.alloc.entries)):
            dinodes += (await self.alloc.rgrp(index)).header.dinodes
        return StatFs(
            bsize=self.bsize,
            blocks=total,
            bfree=free,
            bavail=free,
            files=dinodes + free,
            ffree=free,
        )

    async def getattr(self, ino: int) -> Attr:
        ip = self.inodes.get(ino)
        if ip is not None and self.withdrawn is None:
            return self._attr(ip)
        ghost = self._ghosts.get(ino)
        if ghost is not None and self.withdrawn is None:
            return ghost
        async with self._op(write=False) as txn:
            await self._hold(txn, ino, shared=True)
            return self._attr(await self._inode(ino))

    async def lookup(self, parent: int, name: bytes) -> Attr:
        check_name(name)
        async with self._op(write=False) as txn:
            await self._hold(txn, parent, shared=True)
            dip = await self._dir(parent)
            found = await self.dirs.lookup(dip, name)
            if found is None:
                raise FsError(errno.ENOENT)
            ip = await self._inode(found.dirent.inum.addr)
            if ip.di.formal != found.dirent.inum.formal:
                raise FormatError(
                    f"directory {parent}: entry {name!r} has formal number "
                    f"{found.dirent.inum.formal}, inode has {ip.di.formal}"
                )
            return self._attr(ip)

    async def readlink(self, ino: int) -> bytes:
        async with self._op(write=False) as txn:
            await self._hold(txn, ino, shared=True)
            ip = await self._inode(ino)
            if not ip.di.is_lnk():
                raise FsError(errno.EINVAL)
            return await self.files.read(ip, 0, ip.di.size)

    async def readdir(self, ino: int, cookie: int) -> list[tuple[bytes, Attr, int]]:
        async with self._op(write=False) as txn:
            await self._hold(txn, ino, shared=True)
            dip = await self._dir(ino)
            out = []
            for dirent, next_cookie in await self.dirs.readdir(dip, cookie, READDIR_BATCH):
                ip = await self._inode(dirent.inum.addr)
                out.append((dirent.name, self._attr(ip), next_cookie))
            return out

    # ============================================================ attributes

    async def setattr(self, ino: int, changes: SetAttr) -> Attr:
        ghost = self._ghosts.get(ino)
        if ghost is not None and ino not in self.inodes:
            self._check_alive(True)
            return ghost  # an unlinked inode's last times: nothing left to store them in
        async with self._op() as txn:
            await self._hold(txn, ino)
            ip = await self._inode(ino)
            di = ip.di
            now = time.time_ns()
            if changes.size is not None and changes.size != di.size:
                if di.is_dir():
                    raise FsError(errno.EISDIR)
                if not di.is_reg():
                    raise FsError(errno.EINVAL)
                if changes.size < 0:
                    raise FsError(errno.EINVAL)
                if changes.size > self.geo.heightsize[self.geo.max_height]:
                    raise FsError(errno.EFBIG)
                await self._reserve(self.geo.max_height + 1)
                if changes.size < di.size and di.height and di.blocks > self.free_slice_blocks:
                    await self._shrink_in_slices(ip, changes.size)
                await self.files.truncate(txn, ip, changes.size)
                if changes.mtime_ns is None:
                    di.mtime, di.mtime_nsec = _split_ns(now)
            if changes.mode is not None:
                di.mode = stat.S_IFMT(di.mode) | (changes.mode & 0o7777)
            if changes.uid is not None:
                di.uid = changes.uid
            if changes.gid is not None:
                di.gid = changes.gid
            if changes.atime_ns is not None:
                di.atime, di.atime_nsec = _split_ns(
                    now if changes.atime_ns == NOW else changes.atime_ns
                )
            if changes.mtime_ns is not None:
                di.mtime, di.mtime_nsec = _split_ns(
                    now if changes.mtime_ns == NOW else changes.mtime_ns
                )
            ctime = now if changes.ctime_ns in (None, NOW) else changes.ctime_ns
            di.ctime, di.ctime_nsec = _split_ns(ctime)
            txn.inodes.add(ip)
            return self._attr(ip)

    # ================================================================ data

    async def read(self, ino: int, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0:
            raise FsError(errno.EINVAL)
        # The extents are found under the mount lock; the device reads run without
        # it, so the kernel's readahead requests overlap. The inode glock stays held
        # until the data is in, and a read during which freed blocks may have been
        # handed out again (a log flush) is done over, all under the lock.
        async with self._op(write=False) as txn:
            await self._hold(txn, ino, shared=True)
            ip = await self._inode(ino)
            if ip.di.is_dir():
                raise FsError(errno.EISDIR)
            plan = await self.files.plan_read(ip, offset, size)
            epoch = self.alloc.reuse_epoch
            holders, txn.holders, txn.held = txn.holders, [], {}
        try:
            data = await self.files.fetch(plan)
        except DeviceError as e:
            raise self._withdraw(f"read of inode {ino} failed: {e}") from e
        finally:
            for holder in holders:
                holder.glock.release(holder)
        self._check_alive(False)
        if self.alloc.reuse_epoch != epoch:
            async with self._op(write=False) as txn:
                await self._hold(txn, ino, shared=True)
                data = await self.files.read(await self._inode(ino), offset, size)
        if not self.readonly and self._atime_due(ip):
            async with self._op() as txn:
                await self._hold(txn, ino)
                if not ip.freed:
                    self._stamp_atime(ip, txn)
        return data

    @staticmethod
    def _atime_due(ip: Inode) -> bool:
        """relatime, Linux's default: update atime when it is not newer than mtime
        or ctime, or is a day old; a read costs a metadata write only that often."""
        di = ip.di
        atime = (di.atime, di.atime_nsec)
        if atime <= (di.mtime, di.mtime_nsec) or atime <= (di.ctime, di.ctime_nsec):
            return True
        return time.time() - di.atime >= RELATIME_SECONDS

    @staticmethod
    def _stamp_atime(ip: Inode, txn: FsTxn) -> None:
        ip.di.atime, ip.di.atime_nsec = _split_ns(time.time_ns())
        txn.inodes.add(ip)

    async def write(self, ino: int, offset: int, data: bytes) -> int:
        if offset < 0:
            raise FsError(errno.EINVAL)
        end = offset + len(data)
        if end > self.geo.heightsize[self.geo.max_height] or end > (1 << 63) - 1:
            raise FsError(errno.EFBIG)
        blocks = -(-len(data) // self.bsize) + 2
        async with self._op() as txn:
            await self._hold(txn, ino)
            ip = await self._inode(ino)
            if not ip.di.is_reg():
                raise FsError(errno.EISDIR if ip.di.is_dir() else errno.EINVAL)
            await self._reserve(blocks + 2 * self.geo.max_height)
            written = await self.files.write(txn, ip, offset, data)
            # Set-id bits are cleared before this by the FUSE layer (which knows
            # whether the writer has CAP_FSETID) or by the kernel, as a setattr.
            self._stamp(ip, txn, mtime=True)
            return written

    async def fsync(self, ino: int, datasync: bool) -> None:
        self._check_alive(False)
        if self.readonly:
            return
        async with self._lock:
            try:
                await self.device.flush()
                await self._flush()
            except (JournalError, DeviceError) as e:
                raise self._withdraw(f"fsync failed: {e}") from e

    async def _open_file(self, ino: int) -> None:
        ip = self.inodes.get(ino)
        if ip is not None and self.withdrawn is None and not ip.freed:
            ip.open_count += 1  # the hot path: nothing to read
            return
        async with self._op(write=False):
            ip = await self._inode(ino)
            ip.open_count += 1

    open = _HybridMethod(_mount, _open_file)

    async def release(self, ino: int) -> None:
        ip = self.inodes.get(ino)
        if ip is None:
            return
        ip.open_count = max(0, ip.open_count - 1)
        if ip.open_count == 0 and ip.unlinked and not ip.freed and not self.readonly:
            async with self._op() as txn:
                await self._hold(txn, ino)
                if ip.open_count == 0 and not ip.freed:
                    await self._dealloc(txn, ip)

    async def forget(self, ino: int) -> None:
        self._ghosts.pop(ino, None)
        ip = self.inodes.get(ino)
        if ip is not None and ip.open_count == 0 and not ip.unlinked:
            # Only the table entry goes: an operation in flight keeps its reference.
            del self.inodes[ino]

    # ========================================================== background

    async def serve_glock_demotes(self) -> None:
        """Run the demotions other nodes ask for (blocking callbacks), each under
        the mount lock so no operation sees its cache dropped half way. The FUSE
        layer runs this in its nursery; with lock_nolock it simply waits."""
        while not self._closed and self.withdrawn is None:
            with trio.move_on_after(1.0):
                await self.glocks.wait_for_demotes()
            if self._closed or self.withdrawn is not None:
                return
            async with self._lock:
                try:
                    await self.glocks.run_demotes()
                except (JournalError, DeviceError, FormatError) as e:
                    self._withdraw(f"glock demotion failed: {e}")
                    return

    async def run_periodic_flush(self) -> None:
        """Flush the log every commit_interval seconds (GFS2's commit= option); the
        FUSE layer runs this in its nursery. Returns when the fs closes or withdraws."""
        while not self._closed and self.withdrawn is None and not self.readonly:
            with trio.move_on_after(self.commit_interval):
                await self._closing.wait()
            if self._closed or self.withdrawn is not None:
                return
            async with self._lock:
                if time.monotonic() - self._last_flush >= self.commit_interval * 0.5:
                    try:
                        await self._flush()
                    except (JournalError, DeviceError) as e:
                        self._withdraw(f"periodic flush failed: {e}")
                        return
