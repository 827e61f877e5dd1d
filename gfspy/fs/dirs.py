"""Directories: linear (stuffed) and exhash, as GFS2 lays them out.

A directory starts with its dirents in the dinode. When they no longer fit, they
move to one leaf and the dinode holds a hash table of 2**8 (for 4 KiB blocks)
pointers to it. A full leaf splits while its depth is below the table's; a table at
full depth doubles (up to depth 17); past that, leaves chain. The table moves into
JD blocks once it outgrows the dinode.

Readdir cookies come from the name hash (top bits) plus a second hash of the name,
so an entry keeps its cookie whatever else is added or removed, and leaves walked in
table order yield cookies in increasing order.
"""

from __future__ import annotations

import logging
import struct
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from gfspy.fs.alloc import Allocator
from gfspy.fs.bmap import BlockMap
from gfspy.fs.buffers import BufferCache
from gfspy.fs.inode import Inode
from gfspy.fs.txn import FsTxn
from gfspy.ondisk.checksums import name_hash
from gfspy.ondisk.constants import (
    DIF_EXHASH,
    DINODE_SIZE,
    FORMAT_DE,
    LEAF_HEADER_SIZE,
    META_HEADER_SIZE,
    METATYPE_JD,
    Geometry,
)
from gfspy.ondisk.directory import (
    Dirent,
    Leaf,
    hash_index,
    live_dirents,
    pack_dirents,
    pack_jd_block,
    remove_dirent,
)
from gfspy.ondisk.errors import FormatError
from gfspy.ondisk.indirect import pack_pointers, unpack_pointers
from gfspy.ondisk.meta import Inum, expect_header

log = logging.getLogger(__name__)

DIR_MAX_DEPTH = 17
_ENTRY_FIELDS = struct.Struct(">QQIHHH")  # formal, addr, hash, rec_len, name_len, type
_LF_ENTRIES = 26  # offset of lf_entries in a leaf block
#: Dirent blocks whose names are indexed at once; past it the index starts over.
_NAME_INDEX_LIMIT = 8192


def cookie_of(dhash: int, name: bytes) -> int:
    """Readdir position of an entry: hash in the top 32 of 62 bits, then a second
    hash so entries with equal name hashes still get distinct, stable cookies."""
    return (dhash << 30) | (zlib.adler32(name) & 0x3FFFFFFF)


@dataclass(slots=True)
class _BlockIndex:
    """What a walk of one dirent block learnt: where each live name is, and where
    the last record (the one reaching the end of the block) starts, -1 if unknown."""

    buf: bytearray
    names: dict[bytes, int]
    tail: int


@dataclass(slots=True)
class Found:
    """Where a dirent lives, so it can be changed or removed in place."""

    dirent: Dirent
    blkno: int
    start: int
    offset: int


class Directories:
    def __init__(self, cache: BufferCache, alloc: Allocator, bmap: BlockMap, geo: Geometry):
        self.cache = cache
        self.alloc = alloc
        self.bmap = bmap
        self.geo = geo
        self.bsize = geo.bsize
        #: id(buffer) -> index of a dirent block already walked: a lookup is then
        #: one dict probe instead of a walk of the block. Keyed by the cached buffer
        #: object itself (held by the index, so its id stays unique), so an image the
        #: cache replaced or reloaded is simply not found. Every change to a dirent
        #: block in this module keeps its index exact.
        self._names: dict[int, _BlockIndex] = {}

    # ---------------------------------------------------------------- hash table

    async def table(self, ip: Inode) -> list[int]:
        """The hash table of an exhash directory (cached on the inode)."""
        if ip.hash_table is not None:
            return ip.hash_table
        depth = ip.di.depth
        if depth > DIR_MAX_DEPTH or ip.di.size != 8 << depth:
            raise FormatError(f"directory {ip.addr}: depth {depth} and size {ip.di.size} disagree")
        if ip.di.height == 0:
            buf = await self.cache.read(ip.addr)
            table = unpack_pointers(buf, DINODE_SIZE, 1 << depth)
        else:
            jb = self.geo.jbsize
            nblocks = -(-ip.di.size // jb)
            blocks = await self.bmap.map(ip, 0, nblocks)
            raw = bytearray()
            for blk in blocks:
                if blk == 0:
                    raise FormatError(f"directory {ip.addr}: hole in its hash table")
                buf = await self.cache.read(blk)
                expect_header(buf, 0, METATYPE_JD, f"directory {ip.addr} hash block {blk}")
                raw += buf[META_HEADER_SIZE:]
            table = unpack_pointers(raw, 0, 1 << depth)
        for ptr in table:
            if ptr == 0 or ptr >= self.bmap.dev_blocks:
                raise FormatError(f"directory {ip.addr}: bad leaf pointer {ptr}")
        ip.hash_table = table
        return table

    async def _write_table(self, txn: FsTxn, ip: Inode, first: int, count: int) -> None:
        """Store slots [first, first+count) of the cached table on disk."""
        table = ip.hash_table
        assert table is not None
        size = 8 << ip.di.depth
        if ip.di.height == 0 and size <= self.geo.stuffed_size:
            buf = await self.cache.read(ip.addr)
            buf[DINODE_SIZE + 8 * first : DINODE_SIZE + 8 * (first + count)] = pack_pointers(
                table[first : first + count]
            )
            txn.dirty.add(ip.addr)
            return
        jb = self.geo.jbsize
        if ip.di.height == 0:  # moving out of the dinode: write the whole table
            buf = await self.cache.read(ip.addr)
            buf[DINODE_SIZE:] = bytes(self.bsize - DINODE_SIZE)
            txn.dirty.add(ip.addr)
            ip.di.height = 1
            first, count = 0, len(table)
        need = self.geo.height_for_size(size, is_dir=True)
        if need > ip.di.height:
            await self.bmap.grow_height(txn, ip, need)
        lo = (8 * first) // jb
        hi = -(-(8 * (first + count)) // jb)
        blocks, _new = await self.bmap.allocate(
            txn, ip, lo, hi, meta_init=pack_jd_block(self.bsize, b"")
        )
        raw = pack_pointers(table)
        for i, blk in enumerate(blocks):
            lblock = lo + i
            chunk = raw[lblock * jb : (lblock + 1) * jb]
            buf = await self.cache.read(blk)
            buf[META_HEADER_SIZE : META_HEADER_SIZE + len(chunk)] = chunk
            txn.dirty.add(blk)
        txn.inodes.add(ip)

    # ------------------------------------------------------------------- leaves

    async def _leaf(self, blkno: int, ip: Inode) -> tuple[bytearray, Leaf]:
        buf = await self.cache.read(blkno)
        try:
            return buf, Leaf.unpack(buf)
        except FormatError as e:
            raise FormatError(f"directory {ip.addr}: leaf {blkno}: {e}") from None

    async def _chain(self, ip: Inode, first: int) -> list[tuple[int, bytearray, Leaf]]:
        """The leaves of one chain, head first (a list, not an async generator: an
        abandoned async generator costs trio a finalizer task)."""
        out = []
        blkno = first
        while blkno:
            if len(out) > 1 << 16:
                raise FormatError(f"directory {ip.addr}: leaf chain loops")
            buf, leaf = await self._leaf(blkno, ip)
            out.append((blkno, buf, leaf))
            blkno = leaf.next
        return out

    async def leaf_chains(self, ip: Inode) -> list[tuple[int, int]]:
        """(first slot, leaf block) for each distinct leaf run of the table."""
        table = await self.table(ip)
        out = []
        index = 0
        while index < len(table):
            buf, leaf = await self._leaf(table[index], ip)
            run = 1 << (ip.di.depth - leaf.depth) if leaf.depth <= ip.di.depth else 0
            if (
                run == 0
                or index % run
                or any(p != table[index] for p in table[index : index + run])
            ):
                raise FormatError(f"directory {ip.addr}: leaf {table[index]} has a bad depth")
            out.append((index, table[index]))
            index += run
        return out

    # ------------------------------------------------------------------- lookup

    def _indexed(self, buf: bytearray) -> _BlockIndex | None:
        entry = self._names.get(id(buf))
        return entry if entry is not None and entry.buf is buf else None

    def _index(self, buf: bytearray, start: int) -> dict[bytes, int]:
        """Name -> offset of every live dirent in buf[start:bsize], walked once."""
        entry = self._indexed(buf)
        if entry is not None:
            return entry.names
        names: dict[bytes, int] = {}
        offset = last = start
        end = self.bsize
        while offset < end:
            formal, addr, _h, rec_len, name_len, _ = _ENTRY_FIELDS.unpack_from(buf, offset)
            if rec_len < 40 or offset + rec_len > end:
                raise FormatError(f"dirent at {offset}: bad rec_len {rec_len}")
            if addr and formal and 40 + name_len <= rec_len:
                names.setdefault(bytes(buf[offset + 40 : offset + 40 + name_len]), offset)
            last = offset
            offset += rec_len
        if len(self._names) >= _NAME_INDEX_LIMIT:
            self._names.clear()
        self._names[id(buf)] = _BlockIndex(buf, names, last)
        return names

    def _forget_index(self, buf: bytearray) -> None:
        """The block's dirents moved wholesale (split, conversion): walk it again."""
        self._names.pop(id(buf), None)

    def _scan(self, buf: bytearray, start: int, name: bytes, dhash: int) -> int | None:
        """Offset of the live dirent called `name` in buf[start:bsize], or None."""
        offset = self._index(buf, start).get(name)
        if offset is None:
            return None
        formal, addr, h, _rec_len, name_len, _ = _ENTRY_FIELDS.unpack_from(buf, offset)
        if h != dhash or name_len != len(name) or not addr or not formal:
            return None  # a dirent whose hash is not its name's: as good as absent
        return offset

    def _insert(self, buf: bytearray, start: int, dirent: Dirent) -> bool:
        """Put `dirent` into a record with room (same rules as the ondisk add_dirent):
        the block's last record first, where an append finds its room at once, then
        the first record with room, scanning raw headers."""
        index = self._indexed(buf)
        if (
            index is not None
            and index.tail >= 0
            and self._insert_at(buf, start, index.tail, dirent)
        ):
            return True
        offset = last = start
        while offset < self.bsize:
            if self._insert_at(buf, start, offset, dirent):
                return True
            last = offset
            offset += struct.unpack_from(">H", buf, offset + 20)[0]  # checked by _insert_at
        if index is not None:
            index.tail = last
        return False

    def _insert_at(self, buf: bytearray, start: int, offset: int, dirent: Dirent) -> bool:
        """Put `dirent` into the record at `offset` if it has room."""
        formal, addr, _h, rec_len, name_len, _ = _ENTRY_FIELDS.unpack_from(buf, offset)
        if rec_len < 40 or offset + rec_len > self.bsize:
            raise FormatError(f"dirent at {offset}: bad rec_len {rec_len}")
        needed = dirent.size
        if not addr or not formal:
            if offset != start or rec_len < needed:
                return False
            dirent.rec_len = rec_len
            dirent.pack_into(buf, offset)
            self._index_add(buf, dirent.name, offset)
            return True
        size = (40 + name_len + 7) & ~7
        if rec_len - size < needed:
            return False
        struct.pack_into(">H", buf, offset + 20, size)
        dirent.rec_len = rec_len - size
        dirent.pack_into(buf, offset + size)
        self._index_add(buf, dirent.name, offset + size)
        return True

    def _index_add(self, buf: bytearray, name: bytes, offset: int) -> None:
        entry = self._indexed(buf)
        if entry is not None:
            entry.names.setdefault(name, offset)
            if offset + struct.unpack_from(">H", buf, offset + 20)[0] == self.bsize:
                entry.tail = offset

    async def lookup(self, ip: Inode, name: bytes) -> Found | None:
        dhash = name_hash(name)
        if not ip.di.flags & DIF_EXHASH:
            buf = await self.cache.read(ip.addr)
            off = self._scan(buf, DINODE_SIZE, name, dhash)
            if off is None:
                return None
            return Found(Dirent.unpack(buf, off), ip.addr, DINODE_SIZE, off)
        table = await self.table(ip)
        first = table[hash_index(dhash, ip.di.depth)]
        for blkno, buf, _leaf in await self._chain(ip, first):
            off = self._scan(buf, LEAF_HEADER_SIZE, name, dhash)
            if off is not None:
                return Found(Dirent.unpack(buf, off), blkno, LEAF_HEADER_SIZE, off)
        return None

    # --------------------------------------------------------------------- add

    async def add(self, txn: FsTxn, ip: Inode, name: bytes, inum: Inum, dtype: int) -> None:
        """Insert a new entry (the caller checked that `name` is absent)."""
        dirent = Dirent.make(name, inum, dtype)
        if not ip.di.flags & DIF_EXHASH:
            buf = await self.cache.read(ip.addr)
            if self._insert(buf, DINODE_SIZE, dirent):
                txn.dirty.add(ip.addr)
                self._count(txn, ip, +1)
                return
            await self._to_exhash(txn, ip)
        while True:
            table = await self.table(ip)
            index = hash_index(dirent.hash, ip.di.depth)
            last_blk = 0
            chain_len = 0
            head_depth = None
            for blkno, buf, leaf in await self._chain(ip, table[index]):
                if head_depth is None:
                    head_depth = leaf.depth
                chain_len += 1
                if self._insert(buf, LEAF_HEADER_SIZE, dirent):
                    self._leaf_count(txn, blkno, buf, leaf.entries + 1)
                    self._count(txn, ip, +1)
                    return
                last_blk = blkno
            assert head_depth is not None
            if head_depth < ip.di.depth:
                await self._split(txn, ip, index)
            elif ip.di.depth < DIR_MAX_DEPTH:
                await self._double(txn, ip)
            else:
                await self._chain_leaf(txn, ip, last_blk, head_depth, chain_len + 1, dirent)
                self._count(txn, ip, +1)
                return

    def _count(self, txn: FsTxn, ip: Inode, delta: int) -> None:
        ip.di.entries += delta
        now = time.time_ns()
        ip.di.mtime = ip.di.ctime = now // 1_000_000_000
        ip.di.mtime_nsec = ip.di.ctime_nsec = now % 1_000_000_000
        txn.inodes.add(ip)

    def _leaf_count(self, txn: FsTxn, blkno: int, buf: bytearray, entries: int) -> None:
        struct.pack_into(">H", buf, _LF_ENTRIES, entries)
        txn.dirty.add(blkno)

    def _new_leaf(self, ip: Inode, depth: int, dirents: list[Dirent], dist: int = 1) -> bytes:
        now = time.time_ns()
        leaf = Leaf(
            depth=depth,
            entries=len(dirents),
            dirent_format=FORMAT_DE,
            inode=ip.addr,
            dist=dist,
            sec=now // 1_000_000_000,
            nsec=now % 1_000_000_000,
        )
        return leaf.pack_block(self.bsize, pack_dirents(dirents, self.bsize - LEAF_HEADER_SIZE))

    async def _alloc_leaf(self, txn: FsTxn, ip: Inode, image: bytes) -> int:
        ((blkno, _),) = await self.alloc.allocate(txn, 1, ip.di.goal_meta or ip.addr)
        ip.di.blocks += 1
        ip.di.goal_meta = ip.di.goal_data = blkno
        txn.inodes.add(ip)
        self.cache.new(blkno, image)
        txn.dirty.add(blkno)
        return blkno

    async def _to_exhash(self, txn: FsTxn, ip: Inode) -> None:
        buf = await self.cache.read(ip.addr)
        self._forget_index(buf)
        dirents = [d for _, d in live_dirents(buf, DINODE_SIZE, self.bsize)]
        leaf_blk = await self._alloc_leaf(txn, ip, self._new_leaf(ip, 0, dirents))
        depth = self.geo.min_exhash_depth
        ip.hash_table = [leaf_blk] * (1 << depth)
        buf[DINODE_SIZE:] = bytes(self.bsize - DINODE_SIZE)
        ip.di.flags |= DIF_EXHASH
        ip.di.payload_format = 0
        ip.di.depth = depth
        ip.di.size = 8 << depth
        await self._write_table(txn, ip, 0, 1 << depth)
        log.debug("directory %d: now hashed (%d entries)", ip.addr, len(dirents))

    async def _split(self, txn: FsTxn, ip: Inode, index: int) -> None:
        table = await self.table(ip)
        depth = ip.di.depth
        old_blk = table[index]
        buf, leaf = await self._leaf(old_blk, ip)
        length = 1 << (depth - leaf.depth)
        start = index & ~(length - 1)
        half = length >> 1
        divider = (start + half) << (32 - depth)
        stay: list[Dirent] = []
        move: list[Dirent] = []
        for _, d in live_dirents(buf, LEAF_HEADER_SIZE, self.bsize):
            (move if d.hash < divider else stay).append(d)
        new_blk = await self._alloc_leaf(txn, ip, self._new_leaf(ip, leaf.depth + 1, move))
        leaf.depth += 1
        leaf.entries = len(stay)
        self._forget_index(buf)
        buf[:] = leaf.pack_block(self.bsize, pack_dirents(stay, self.bsize - LEAF_HEADER_SIZE))
        txn.dirty.add(old_blk)
        table[start : start + half] = [new_blk] * half
        await self._write_table(txn, ip, start, half)

    async def _double(self, txn: FsTxn, ip: Inode) -> None:
        table = await self.table(ip)
        doubled = [p for p in table for _ in (0, 1)]
        ip.hash_table = doubled
        ip.di.depth += 1
        ip.di.size = 8 << ip.di.depth
        txn.inodes.add(ip)
        await self._write_table(txn, ip, 0, len(doubled))
        log.debug("directory %d: hash table doubled to depth %d", ip.addr, ip.di.depth)

    async def _chain_leaf(
        self, txn: FsTxn, ip: Inode, last_blk: int, depth: int, dist: int, dirent: Dirent
    ) -> None:
        new_blk = await self._alloc_leaf(txn, ip, self._new_leaf(ip, depth, [dirent], dist))
        buf, leaf = await self._leaf(last_blk, ip)
        leaf.next = new_blk
        leaf.pack_into(buf)
        txn.dirty.add(last_blk)

    # ------------------------------------------------------------------ remove

    async def remove(self, txn: FsTxn, ip: Inode, found: Found) -> None:
        buf = await self.cache.read(found.blkno)
        remove_dirent(buf, found.start, self.bsize, found.offset)
        entry = self._indexed(buf)
        if entry is not None:
            if entry.names.get(found.dirent.name) == found.offset:
                del entry.names[found.dirent.name]
            if entry.tail == found.offset:
                entry.tail = -1  # merged into the record before it: found by the next walk
        txn.dirty.add(found.blkno)
        if found.start == LEAF_HEADER_SIZE:
            entries = struct.unpack_from(">H", buf, _LF_ENTRIES)[0]
            self._leaf_count(txn, found.blkno, buf, entries - 1)
        self._count(txn, ip, -1)

    async def set_target(self, txn: FsTxn, ip: Inode, found: Found, inum: Inum, dtype: int) -> None:
        """Point an existing entry at another inode (rename exchange, '..')."""
        buf = await self.cache.read(found.blkno)
        struct.pack_into(">QQ", buf, found.offset, inum.formal, inum.addr)
        struct.pack_into(">H", buf, found.offset + 24, dtype)
        txn.dirty.add(found.blkno)
        self._count(txn, ip, 0)

    # ----------------------------------------------------------------- listing

    async def entries(self, ip: Inode) -> AsyncIterator[Dirent]:
        """Every live entry, in no particular order."""
        if not ip.di.flags & DIF_EXHASH:
            buf = await self.cache.read(ip.addr)
            for _, d in live_dirents(buf, DINODE_SIZE, self.bsize):
                yield d
            return
        for _, first in await self.leaf_chains(ip):
            for _, buf, _leaf in await self._chain(ip, first):
                for _, d in live_dirents(buf, LEAF_HEADER_SIZE, self.bsize):
                    yield d

    async def readdir(self, ip: Inode, cookie: int, limit: int) -> list[tuple[Dirent, int]]:
        """Up to `limit` entries whose cookie is >= `cookie`, in cookie order, each
        with the cookie that resumes after it."""
        out: list[tuple[Dirent, int]] = []
        if not ip.di.flags & DIF_EXHASH:
            batch = [d async for d in self.entries(ip)]
            return self._ordered(batch, cookie, limit, out)
        table = await self.table(ip)
        depth = ip.di.depth
        index = hash_index(cookie >> 30, depth) if cookie else 0
        while index < len(table) and len(out) < limit:
            first = table[index]
            _buf, head = await self._leaf(first, ip)
            run = 1 << (depth - head.depth)
            batch = []
            for _, buf, _leaf in await self._chain(ip, first):
                batch.extend(d for _, d in live_dirents(buf, LEAF_HEADER_SIZE, self.bsize))
            self._ordered(batch, cookie, limit, out)
            index = (index & ~(run - 1)) + run
        return out

    @staticmethod
    def _ordered(
        batch: list[Dirent], cookie: int, limit: int, out: list[tuple[Dirent, int]]
    ) -> list[tuple[Dirent, int]]:
        keyed = (
            sorted((k, d) for d in batch if (k := cookie_of(d.hash, d.name)) >= cookie)
            if batch
            else []
        )
        for key, d in keyed:
            if len(out) >= limit:
                break
            out.append((d, key + 1))
        return out

    # ---------------------------------------------------------------- teardown

    async def free_all(self, txn: FsTxn, ip: Inode) -> None:
        """Free every leaf and hash-table block of a directory being deleted."""
        if not ip.di.flags & DIF_EXHASH:
            return
        leaves: list[int] = []
        for _, first in await self.leaf_chains(ip):
            for blkno, _buf, _leaf in await self._chain(ip, first):
                leaves.append(blkno)
        await self.alloc.free(txn, leaves)
        txn.revoke.update(leaves)
        ip.di.blocks -= len(leaves)
        for blk in leaves:
            self.cache.drop(blk)
        await self.bmap.truncate(txn, ip, 0, metadata_data=True)
        ip.hash_table = None
        txn.inodes.add(ip)
