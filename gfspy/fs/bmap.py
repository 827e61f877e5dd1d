"""Block mapping: logical block -> device block through a dinode's pointer tree.

Heights follow the format: the dinode holds `diptrs` pointers, every IN block
`inptrs`, and a logical block's path is its base-`inptrs` digits. One walk serves
lookups, allocation and truncation, and handles a whole pointer array per step, so
mapping a megabyte costs a few slices, not a loop per block over the tree.
"""

from __future__ import annotations

import errno
import logging
import struct

from gfspy.fs.alloc import Allocator
from gfspy.fs.buffers import BufferCache
from gfspy.fs.inode import Inode
from gfspy.fs.txn import FsTxn
from gfspy.fs.types import FsError
from gfspy.ondisk.constants import DINODE_SIZE, META_HEADER_SIZE, METATYPE_IN, Geometry
from gfspy.ondisk.errors import FormatError
from gfspy.ondisk.indirect import pack_indirect_block, pack_pointers, unpack_pointers
from gfspy.ondisk.meta import expect_header

log = logging.getLogger(__name__)


class BlockMap:
    def __init__(self, cache: BufferCache, alloc: Allocator, geo: Geometry) -> None:
        self.cache = cache
        self.alloc = alloc
        self.geo = geo
        self.dev_blocks = cache.device.size // geo.bsize

    def capacity(self, height: int) -> int:
        """Logical blocks a tree of `height` can address."""
        if height == 0:
            return 0
        return self.geo.diptrs * self.geo.inptrs ** (height - 1)

    def height_for_blocks(self, nblocks: int) -> int:
        height = 1
        while self.capacity(height) < nblocks:
            height += 1
        if height > self.geo.max_height:
            raise FsError(errno.EFBIG)
        return height

    def _check_ptr(self, ptr: int, where: int) -> None:
        if ptr >= self.dev_blocks or ptr <= self.geo.sb_block:
            raise FormatError(f"block {where}: pointer {ptr} is outside the filesystem")

    async def _container(self, blkno: int, is_dinode: bool) -> bytearray:
        buf = await self.cache.read(blkno)
        if not is_dinode:
            expect_header(buf, 0, METATYPE_IN, f"indirect block {blkno}")
        return buf

    # ------------------------------------------------------------------ lookup

    async def map(self, ip: Inode, lo: int, hi: int) -> list[int]:
        """Device block of each logical block in [lo, hi); 0 for holes."""
        out = [0] * (hi - lo)
        height = ip.di.height
        if height == 0 or hi <= lo:
            return out
        hi = min(hi, self.capacity(height))
        if hi > lo:
            await self._walk(None, ip, ip.addr, True, self._top_span(height), 0, lo, hi, out, lo)
        return out

    def _top_span(self, height: int) -> int:
        return self.geo.inptrs ** (height - 1)

    async def allocate(
        self, txn: FsTxn, ip: Inode, lo: int, hi: int, *, meta_init: bytes | None = None
    ) -> tuple[list[int], set[int]]:
        """Map [lo, hi), allocating every hole; returns (blocks, new logical blocks).

        The tree must already be tall enough. With `meta_init` each new block is a
        metadata block (directory JD) installed in the cache with that image."""
        out = [0] * (hi - lo)
        new: set[int] = set()
        if hi <= lo:
            return out, new
        if hi > self.capacity(ip.di.height):
            raise ValueError("tree too short for the range; grow its height first")
        ctx = (txn, new, meta_init)
        await self._walk(ctx, ip, ip.addr, True, self._top_span(ip.di.height), 0, lo, hi, out, lo)
        return out, new

    async def _walk(
        self,
        ctx: tuple[FsTxn, set[int], bytes | None] | None,
        ip: Inode,
        blkno: int,
        is_dinode: bool,
        span: int,
        base: int,
        lo: int,
        hi: int,
        out: list[int],
        out_base: int,
    ) -> None:
        geo = self.geo
        buf = await self._container(blkno, is_dinode)
        offset = DINODE_SIZE if is_dinode else META_HEADER_SIZE
        nslots = geo.diptrs if is_dinode else geo.inptrs
        first = (lo - base) // span
        last = min(nslots - 1, (hi - 1 - base) // span)
        count = last - first + 1
        ptrs = unpack_pointers(buf, offset + 8 * first, count)
        if span == 1:
            if ctx is not None:
                holes = [i for i, p in enumerate(ptrs) if p == 0]
                if holes:
                    txn, new, meta_init = ctx
                    got = await self._alloc_blocks(txn, ip, len(holes), meta_init)
                    for i, blk in zip(holes, got, strict=True):
                        ptrs[i] = blk
                        new.add(base + first + i)
                    buf[offset + 8 * first : offset + 8 * (first + count)] = pack_pointers(ptrs)
                    self._dirty(txn, ip, blkno, is_dinode)
            for p in ptrs:
                if p:
                    self._check_ptr(p, blkno)
            start = base + first - out_base
            out[start : start + count] = ptrs
            return
        for i, child in enumerate(ptrs):
            slot_base = base + (first + i) * span
            if child == 0:
                if ctx is None:
                    continue
                txn = ctx[0]
                (child,) = await self._alloc_blocks(txn, ip, 1, pack_indirect_block(geo.bsize, []))
                struct.pack_into(">Q", buf, offset + 8 * (first + i), child)
                self._dirty(txn, ip, blkno, is_dinode)
            else:
                self._check_ptr(child, blkno)
            await self._walk(
                ctx,
                ip,
                child,
                False,
                span // geo.inptrs,
                slot_base,
                max(lo, slot_base),
                min(hi, slot_base + span),
                out,
                out_base,
            )

    def _dirty(self, txn: FsTxn, ip: Inode, blkno: int, is_dinode: bool) -> None:
        if is_dinode:
            txn.inodes.add(ip)
        txn.dirty.add(blkno)

    async def _alloc_blocks(
        self, txn: FsTxn, ip: Inode, count: int, meta_init: bytes | None
    ) -> list[int]:
        goal = ip.di.goal_meta or ip.addr
        extents = await self.alloc.allocate(txn, count, goal + 1)
        blocks = [b for start, length in extents for b in range(start, start + length)]
        ip.di.blocks += count
        ip.di.goal_meta = ip.di.goal_data = blocks[-1]
        txn.inodes.add(ip)
        if meta_init is not None:
            for blk in blocks:
                self.cache.new(blk, meta_init)
                txn.dirty.add(blk)
        return blocks

    # ------------------------------------------------------------------ height

    async def grow_height(self, txn: FsTxn, ip: Inode, height: int) -> None:
        """Raise an unstuffed tree to `height`: the dinode's pointers move down into
        a new IN block each level (its slot 0 covers everything addressed so far)."""
        if ip.di.height == 0:
            raise ValueError("unstuff before growing the tree")
        if height > self.geo.max_height:
            raise FsError(errno.EFBIG)
        buf = await self.cache.read(ip.addr)
        area = slice(DINODE_SIZE, DINODE_SIZE + 8 * self.geo.diptrs)
        while ip.di.height < height:
            if any(buf[area]):
                image = bytearray(pack_indirect_block(self.geo.bsize, []))
                image[META_HEADER_SIZE : META_HEADER_SIZE + 8 * self.geo.diptrs] = buf[area]
                (blk,) = await self._alloc_blocks(txn, ip, 1, bytes(image))
                buf[area] = bytes(8 * self.geo.diptrs)
                struct.pack_into(">Q", buf, DINODE_SIZE, blk)
                txn.dirty.add(ip.addr)
            ip.di.height += 1
            txn.inodes.add(ip)

    # ---------------------------------------------------------------- truncate

    async def truncate(self, txn: FsTxn, ip: Inode, keep: int, *, metadata_data: bool) -> None:
        """Free every logical block >= `keep`, and IN blocks left covering nothing.

        `metadata_data` says the data blocks are journaled metadata (directory JD
        blocks) whose logged copies must be revoked."""
        if ip.di.height == 0:
            return
        data: list[int] = []
        meta: list[int] = []
        await self._free_walk(
            txn, ip, ip.addr, True, self._top_span(ip.di.height), 0, keep, data, meta
        )
        freed = data + meta
        if freed:
            await self.alloc.free(txn, freed)
            ip.di.blocks -= len(freed)
            txn.inodes.add(ip)
            txn.revoke.update(meta)
            for blk in meta:
                self.cache.drop(blk)
            if metadata_data:
                txn.revoke.update(data)
                for blk in data:
                    self.cache.drop(blk)

    async def _free_walk(
        self,
        txn: FsTxn,
        ip: Inode,
        blkno: int,
        is_dinode: bool,
        span: int,
        base: int,
        keep: int,
        data: list[int],
        meta: list[int],
    ) -> None:
        geo = self.geo
        buf = await self._container(blkno, is_dinode)
        offset = DINODE_SIZE if is_dinode else META_HEADER_SIZE
        nslots = geo.diptrs if is_dinode else geo.inptrs
        first = max(0, (keep - base) // span)
        if first >= nslots:
            return
        ptrs = unpack_pointers(buf, offset + 8 * first, nslots - first)
        changed = False
        for i, ptr in enumerate(ptrs):
            if ptr == 0:
                continue
            self._check_ptr(ptr, blkno)
            slot_base = base + (first + i) * span
            if span == 1:
                data.append(ptr)
                ptrs[i] = 0
                changed = True
                continue
            await self._free_walk(
                txn, ip, ptr, False, span // geo.inptrs, slot_base, keep, data, meta
            )
            if slot_base >= keep:
                meta.append(ptr)
                ptrs[i] = 0
                changed = True
        if changed:
            buf[offset + 8 * first : offset + 8 * nslots] = pack_pointers(ptrs)
            self._dirty(txn, ip, blkno, is_dinode)
