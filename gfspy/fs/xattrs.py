"""Extended attributes in GFS2's EA blocks: user., trusted., security. and the two
system.posix_acl_* names, values stored inline or in ED blocks.

An inode starts with one EA block at di_eattr; when it is full the inode switches to
EA_INDIRECT: di_eattr then names an IN block listing EA blocks, and new blocks are
appended to that list.
"""

from __future__ import annotations

import errno
import logging
import struct
import time
from dataclasses import dataclass

from gfspy.fs.alloc import Allocator
from gfspy.fs.buffers import BufferCache
from gfspy.fs.inode import Inode
from gfspy.fs.txn import FsTxn
from gfspy.fs.types import XATTR_CREATE, XATTR_REPLACE, FsError
from gfspy.ondisk.constants import (
    DIF_EA_INDIRECT,
    EA_MAX_DATA_LEN,
    EATYPE_SYS,
    EATYPE_TRUSTED,
    EATYPE_UNUSED,
    META_HEADER_SIZE,
    METATYPE_IN,
    Geometry,
)
from gfspy.ondisk.errors import FormatError
from gfspy.ondisk.indirect import pack_indirect_block, unpack_indirect_block
from gfspy.ondisk.meta import expect_header
from gfspy.ondisk.xattr import (
    EARecord,
    add_ea_record,
    ea_is_stuffed,
    ea_num_ptrs,
    ed_payload,
    iter_ea_records,
    join_xattr_name,
    new_ea_block,
    pack_ed_block,
    remove_ea_record,
    split_value,
    split_xattr_name,
)

log = logging.getLogger(__name__)

_SYSTEM_NAMES = (b"posix_acl_access", b"posix_acl_default")


#: EA blocks whose records are indexed at once; past it the index starts over.
_EA_INDEX_LIMIT = 4096


@dataclass(slots=True)
class _EAIndex:
    """One walk of an EA block: where each named record is, and the smallest record
    size that was found not to fit (so a full block is not walked again for it)."""

    buf: bytearray
    names: dict[tuple[int, bytes], int]
    no_room_for: int


@dataclass(slots=True)
class _Where:
    blkno: int
    offset: int
    record: EARecord


def parse_name(full: bytes, fs_format: int) -> tuple[int, bytes]:
    """b"user.x" -> (type, b"x"); EOPNOTSUPP for namespaces GFS2 cannot store."""
    try:
        ea_type, short = split_xattr_name(full)
    except FormatError:
        raise FsError(errno.EOPNOTSUPP, f"unsupported xattr namespace: {full!r}") from None
    if ea_type == EATYPE_SYS and short not in _SYSTEM_NAMES:
        raise FsError(errno.EOPNOTSUPP, f"unsupported system xattr {full!r}")
    if ea_type == EATYPE_TRUSTED and fs_format < 1802:
        raise FsError(errno.EOPNOTSUPP, "trusted xattrs need fs format 1802")
    if not short or len(short) > 255:
        raise FsError(errno.ERANGE if short else errno.EINVAL, "bad xattr name length")
    return ea_type, short


class Xattrs:
    def __init__(self, cache: BufferCache, alloc: Allocator, geo: Geometry, fs_format: int):
        self.cache = cache
        self.alloc = alloc
        self.geo = geo
        self.bsize = geo.bsize
        self.fs_format = fs_format
        #: id(buffer) -> index of an EA block, keyed by the cached buffer object as
        #: in Directories: a lookup among thousands of xattrs is then a dict probe
        #: per EA block, not a decode of every record. Dropped on every change.
        self._indexes: dict[int, _EAIndex] = {}

    def _index(self, buf: bytearray) -> _EAIndex:
        entry = self._indexes.get(id(buf))
        if entry is not None and entry.buf is buf:
            return entry
        names: dict[tuple[int, bytes], int] = {}
        for offset, rec in iter_ea_records(buf, self.bsize):
            if rec.type != EATYPE_UNUSED:
                names.setdefault((rec.type, rec.name), offset)
        if len(self._indexes) >= _EA_INDEX_LIMIT:
            self._indexes.clear()
        entry = self._indexes[id(buf)] = _EAIndex(buf, names, 1 << 30)
        return entry

    def _changed(self, buf: bytearray) -> None:
        self._indexes.pop(id(buf), None)

    async def _ea_blocks(self, ip: Inode) -> list[int]:
        if not ip.di.eattr:
            return []
        if not ip.di.flags & DIF_EA_INDIRECT:
            return [ip.di.eattr]
        buf = await self.cache.read(ip.di.eattr)
        ptrs = unpack_indirect_block(buf, self.bsize)
        out = []
        for p in ptrs:
            if p == 0:
                break
            out.append(p)
        return out

    async def _records(self, ip: Inode) -> list[_Where]:
        out = []
        for blkno in await self._ea_blocks(ip):
            buf = await self.cache.read(blkno)
            for offset, rec in iter_ea_records(buf, self.bsize):
                if rec.type != EATYPE_UNUSED:
                    out.append(_Where(blkno, offset, rec))
        return out

    async def _find(self, ip: Inode, ea_type: int, short: bytes) -> _Where | None:
        key = (ea_type, short)
        for blkno in await self._ea_blocks(ip):
            buf = await self.cache.read(blkno)
            offset = self._index(buf).names.get(key)
            if offset is not None:
                return _Where(blkno, offset, EARecord.unpack(buf, offset))
        return None

    async def _value(self, rec: EARecord) -> bytes:
        if rec.is_stuffed:
            return rec.value
        parts = []
        for ptr in rec.pointers:
            buf = await self.cache.read(ptr)
            parts.append(bytes(ed_payload(buf, self.bsize)))
        return b"".join(parts)[: rec.data_len]

    async def get(self, ip: Inode, full: bytes) -> bytes:
        ea_type, short = parse_name(full, self.fs_format)
        where = await self._find(ip, ea_type, short)
        if where is None:
            raise FsError(errno.ENODATA)
        return await self._value(where.record)

    async def list(self, ip: Inode) -> list[bytes]:
        return [join_xattr_name(w.record.type, w.record.name) for w in await self._records(ip)]

    async def set(self, txn: FsTxn, ip: Inode, full: bytes, value: bytes, flags: int) -> None:
        ea_type, short = parse_name(full, self.fs_format)
        if len(value) > EA_MAX_DATA_LEN:
            raise FsError(errno.E2BIG)
        where = await self._find(ip, ea_type, short)
        if where is not None and flags & XATTR_CREATE:
            raise FsError(errno.EEXIST)
        if where is None and flags & XATTR_REPLACE:
            raise FsError(errno.ENODATA)
        if where is not None:
            await self._remove(txn, ip, where)
        record = EARecord(0, len(value), len(short), ea_type, name=short)
        jb = self.geo.jbsize
        if ea_is_stuffed(jb, len(short), len(value)):
            record.value = value
        else:
            chunks = split_value(value, jb)
            record.num_ptrs = ea_num_ptrs(jb, len(value))
            blocks = await self._alloc(txn, ip, len(chunks))
            for blk, chunk in zip(blocks, chunks, strict=True):
                self.cache.new(blk, pack_ed_block(self.bsize, chunk))
                txn.dirty.add(blk)
            record.pointers = tuple(blocks)
        await self._insert(txn, ip, record)
        self._touch(txn, ip)

    async def remove(self, txn: FsTxn, ip: Inode, full: bytes) -> None:
        ea_type, short = parse_name(full, self.fs_format)
        where = await self._find(ip, ea_type, short)
        if where is None:
            raise FsError(errno.ENODATA)
        await self._remove(txn, ip, where)
        self._touch(txn, ip)

    def _touch(self, txn: FsTxn, ip: Inode) -> None:
        now = time.time_ns()
        ip.di.ctime, ip.di.ctime_nsec = divmod(now, 1_000_000_000)
        txn.inodes.add(ip)

    async def _alloc(self, txn: FsTxn, ip: Inode, count: int) -> list[int]:
        extents = await self.alloc.allocate(txn, count, ip.di.goal_meta or ip.addr)
        blocks = [b for s, n in extents for b in range(s, s + n)]
        ip.di.blocks += count
        ip.di.goal_meta = ip.di.goal_data = blocks[-1]
        txn.inodes.add(ip)
        return blocks

    async def _remove(self, txn: FsTxn, ip: Inode, where: _Where) -> None:
        buf = await self.cache.read(where.blkno)
        rec = remove_ea_record(buf, where.offset)
        self._changed(buf)
        txn.dirty.add(where.blkno)
        if rec.pointers:
            await self.alloc.free(txn, list(rec.pointers))
            txn.revoke.update(rec.pointers)
            ip.di.blocks -= len(rec.pointers)
            for p in rec.pointers:
                self.cache.drop(p)
            txn.inodes.add(ip)

    async def _insert(self, txn: FsTxn, ip: Inode, record: EARecord) -> None:
        needed = record.size
        for blkno in await self._ea_blocks(ip):
            buf = await self.cache.read(blkno)
            index = self._index(buf)
            if needed >= index.no_room_for:
                continue
            if add_ea_record(buf, record) is not None:
                self._changed(buf)
                txn.dirty.add(blkno)
                return
            index.no_room_for = needed
        (new_blk,) = await self._alloc(txn, ip, 1)
        buf = self.cache.new(new_blk, new_ea_block(self.bsize))
        if add_ea_record(buf, record) is None:
            raise FormatError("xattr record does not fit an empty EA block")
        txn.dirty.add(new_blk)
        if not ip.di.eattr:
            ip.di.eattr = new_blk
        elif not ip.di.flags & DIF_EA_INDIRECT:
            (ind,) = await self._alloc(txn, ip, 1)
            self.cache.new(ind, pack_indirect_block(self.bsize, [ip.di.eattr, new_blk]))
            txn.dirty.add(ind)
            ip.di.eattr = ind
            ip.di.flags |= DIF_EA_INDIRECT
        else:
            ind_buf = await self.cache.read(ip.di.eattr)
            expect_header(ind_buf, 0, METATYPE_IN, f"EA indirect block {ip.di.eattr}")
            ptrs = unpack_indirect_block(ind_buf, self.bsize)
            try:
                slot = ptrs.index(0)
            except ValueError:
                raise FsError(errno.ENOSPC, "no room for more xattr blocks") from None
            struct.pack_into(">Q", ind_buf, META_HEADER_SIZE + 8 * slot, new_blk)
            txn.dirty.add(ip.di.eattr)
        txn.inodes.add(ip)

    async def free_all(self, txn: FsTxn, ip: Inode) -> None:
        """Free every EA, ED and EA-indirect block of an inode being deleted."""
        if not ip.di.eattr:
            return
        blocks: list[int] = []
        for where in await self._records(ip):
            blocks.extend(where.record.pointers)
        blocks.extend(await self._ea_blocks(ip))
        if ip.di.flags & DIF_EA_INDIRECT:
            blocks.append(ip.di.eattr)
        await self.alloc.free(txn, blocks)
        txn.revoke.update(blocks)
        for blk in blocks:
            self.cache.drop(blk)
        ip.di.blocks -= len(blocks)
        ip.di.eattr = 0
        ip.di.flags &= ~DIF_EA_INDIRECT
        txn.inodes.add(ip)
