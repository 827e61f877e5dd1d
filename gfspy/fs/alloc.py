"""The resource-group allocator: bitmaps with 2-bit states, goal blocks, extents.

Each rgrp's concatenated bitmap is kept decoded in memory; a change rewrites only
the header block and the bitmap blocks it touched, as images in the caller's
transaction. Runs of free blocks are found a byte (four blocks) at a time with
bytes operations rather than a Python loop per block.
"""

from __future__ import annotations

import bisect
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from gfspy.fs.buffers import BufferCache
from gfspy.fs.txn import FsTxn
from gfspy.ondisk.constants import (
    BLKST_DINODE,
    BLKST_FREE,
    BLKST_UNLINKED,
    BLKST_USED,
    META_HEADER_SIZE,
    RG_HEADER_SIZE,
    RGF_NOALLOC,
)
from gfspy.ondisk.errors import FormatError
from gfspy.ondisk.rgrp import (
    RgrpBitmapHeader,
    RgrpHeader,
    RindexEntry,
    count_states,
    extract_bitmap,
    find_state,
    get_state,
    set_state,
)

log = logging.getLogger(__name__)

_RB_HEADER = RgrpBitmapHeader().pack()


class NoSpace(Exception):
    """No rgrp has the free blocks asked for."""


@dataclass(eq=False)
class Rgrp:
    entry: RindexEntry
    header: RgrpHeader
    bitmap: bytearray
    #: Bitmap-block indexes touched since the images were last rebuilt.
    touched: set[int] = field(default_factory=set)
    #: The bitmap as allocation sees it while blocks freed since the last log flush
    #: stay reserved (GFS2's "clone" bitmap): reusing them before the free is durable
    #: could put new data in blocks a replay would still hand back to the old file.
    clone: bytearray | None = None


def _bitmap_block_of(byte: int, bsize: int) -> int:
    first = bsize - RG_HEADER_SIZE
    if byte < first:
        return 0
    return 1 + (byte - first) // (bsize - META_HEADER_SIZE)


class Allocator:
    """All rgrps of the filesystem; allocation and freeing inside transactions."""

    def __init__(self, cache: BufferCache, entries: list[RindexEntry]) -> None:
        self.cache = cache
        self.bsize = cache.bsize
        self.entries = sorted(entries, key=lambda e: e.addr)
        self._starts = [e.data0 for e in self.entries]
        self._rgrps: dict[int, Rgrp] = {}
        #: Bumped whenever freed blocks may be handed out again: a read that mapped
        #: blocks and then read them without the mount lock checks it did not change.
        self.reuse_epoch = 0
        self._last_rgrp = 0
        #: Free blocks over all rgrps, and how many of them stay reserved until the
        #: next log flush (freed since; see Rgrp.clone).
        self.free_total = 0
        self.pinned = 0
        #: Free blocks in rgrps flagged NOALLOC: counted by statfs, never handed out.
        self.noalloc_free = 0
        #: Called with (txn, rgrp address) before an rgrp is changed: the mount
        #: takes the rgrp's glock there.
        self.on_use: Callable[[FsTxn, int], Awaitable[None]] | None = None

    # ------------------------------------------------------------------ loading

    def rgrp_index_of(self, block: int) -> int | None:
        i = bisect.bisect_right(self._starts, block) - 1
        if i >= 0 and self.entries[i].contains(block):
            return i
        return None

    async def rgrp(self, index: int) -> Rgrp:
        rg = self._rgrps.get(index)
        if rg is not None:
            return rg
        entry = self.entries[index]
        blocks = [await self.cache.read(entry.addr + i) for i in range(entry.length)]
        header = RgrpHeader.unpack(blocks[0])
        if not header.matches(entry):
            raise FormatError(f"rgrp {entry.addr}: header disagrees with rindex")
        bitmap = extract_bitmap(blocks, self.bsize, entry.bitbytes)
        free, used, unlinked, dinodes = count_states(bitmap, entry.data)
        if free != header.free:
            raise FormatError(
                f"rgrp {entry.addr}: rg_free {header.free} but bitmap has {free} free"
            )
        rg = Rgrp(entry, header, bitmap)
        self._rgrps[index] = rg
        return rg

    def release_freed(self) -> None:
        """The log was flushed: blocks freed before it may be handed out again."""
        for rg in self._rgrps.values():
            rg.clone = None
        self.pinned = 0
        self.reuse_epoch += 1

    @property
    def available(self) -> int:
        """Blocks an allocation can get right now."""
        return self.free_total - self.pinned - self.noalloc_free

    async def load_all(self) -> None:
        """Decode every rgrp (mount): totals for statfs and reservations."""
        self.free_total = 0
        self.noalloc_free = 0
        for index in range(len(self.entries)):
            rg = await self.rgrp(index)
            self.free_total += rg.header.free
            if rg.header.flags & RGF_NOALLOC:
                self.noalloc_free += rg.header.free

    def invalidate(self) -> None:
        """Forget decoded rgrps (rgrp glock given up): reread on next use."""
        self.reuse_epoch += 1  # another node may hand our freed blocks out
        self._rgrps.clear()

    async def _use(self, txn: FsTxn, index: int) -> Rgrp:
        rg = await self.rgrp(index)
        if self.on_use is not None and rg not in txn.rgrps:
            await self.on_use(txn, rg.entry.addr)
        return rg

    def _mark(self, txn: FsTxn, rg: Rgrp, n_first: int, n_last: int) -> None:
        first = _bitmap_block_of(n_first >> 2, self.bsize)
        last = _bitmap_block_of(n_last >> 2, self.bsize)
        rg.touched.update(range(first, last + 1))
        rg.touched.add(0)
        txn.rgrps.add(rg)

    def write_images(self, rg: Rgrp) -> list[int]:
        """Rebuild the header/bitmap block images that changed; return their numbers."""
        out = []
        first = self.bsize - RG_HEADER_SIZE
        per_rb = self.bsize - META_HEADER_SIZE
        for i in sorted(rg.touched):
            lo = 0 if i == 0 else first + (i - 1) * per_rb
            hi = first if i == 0 else lo + per_rb
            part = bytes(rg.bitmap[lo:hi])
            part += bytes((hi - lo) - len(part))
            blkno = rg.entry.addr + i
            # Header and bitmap together are the whole block: no need to read it.
            buf = self.cache.cached(blkno)
            if buf is None:
                buf = self.cache.new(blkno, bytes(self.bsize))
            if i == 0:
                buf[:RG_HEADER_SIZE] = rg.header.pack()
                buf[RG_HEADER_SIZE:] = part
            else:
                buf[:META_HEADER_SIZE] = _RB_HEADER
                buf[META_HEADER_SIZE:] = part
            out.append(blkno)
        rg.touched.clear()
        return out

    # --------------------------------------------------------------- allocation

    async def allocate(
        self, txn: FsTxn, count: int, goal: int, *, dinode: bool = False
    ) -> list[tuple[int, int]]:
        """`count` blocks as extents [(start, length)], near `goal` when possible.

        With `dinode`, `count` must be 1 and the block is marked DINODE."""
        extents: list[tuple[int, int]] = []
        want = count
        start_index = self.rgrp_index_of(goal)
        if start_index is None:
            start_index = self._last_rgrp
        # Lazily: a 1 TiB filesystem has thousands of rgrps, and most allocations
        # are served by the first one tried.
        order = itertools.chain(range(start_index, len(self.entries)), range(start_index))
        for index in order:
            if want == 0:
                break
            rg = await self.rgrp(index)
            if rg.header.free == 0 or rg.header.flags & RGF_NOALLOC:
                continue
            await self._use(txn, index)
            n = goal - rg.entry.data0 if index == start_index and rg.entry.contains(goal) else 0
            got = self._take(txn, rg, want, max(n, 0), dinode)
            if not got:
                continue
            extents.extend(got)
            want -= sum(length for _, length in got)
            self._last_rgrp = index
        if want:
            # Callers reserve space first (see `available`), so this is a bug or a
            # bitmap that disagrees with its counts: the operation must not go on.
            raise NoSpace(f"no room for {count} blocks although space was reserved")
        txn.statfs_free -= count
        self.free_total -= count
        if dinode:
            txn.statfs_dinodes += 1
        return extents

    def _take(self, txn: FsTxn, rg: Rgrp, want: int, n: int, dinode: bool) -> list[tuple[int, int]]:
        ndata = rg.entry.data
        got: list[tuple[int, int]] = []
        wrapped = False
        view = rg.bitmap if rg.clone is None else rg.clone
        while want and rg.header.free:
            hit = _find_free(view, n, ndata)
            if hit is None:
                if wrapped or n == 0:
                    break
                wrapped, n = True, 0
                continue
            run = _free_run(view, hit, min(want, ndata - hit))
            state = BLKST_DINODE if dinode else BLKST_USED
            _fill(rg.bitmap, hit, run, state)
            if rg.clone is not None:
                _fill(rg.clone, hit, run, state)
            rg.header.free -= run
            if dinode:
                rg.header.dinodes += 1
            self._mark(txn, rg, hit, hit + run - 1)
            got.append((rg.entry.data0 + hit, run))
            want -= run
            n = hit + run
        return got

    async def next_generation(self, txn: FsTxn, block: int) -> int:
        """The rgrp's inode generation counter, post-incremented (never 0)."""
        index = self.rgrp_index_of(block)
        assert index is not None
        rg = await self._use(txn, index)
        rg.header.igeneration += 1
        if rg.header.igeneration == 0:
            rg.header.igeneration = 1
        self._mark(txn, rg, block - rg.entry.data0, block - rg.entry.data0)
        return rg.header.igeneration

    async def set_unlinked(self, txn: FsTxn, block: int, unlinked: bool) -> None:
        """DINODE <-> UNLINKED for an inode whose last link went while it was open."""
        index = self.rgrp_index_of(block)
        if index is None:
            raise FormatError(f"dinode {block} is outside every rgrp")
        rg = await self._use(txn, index)
        n = block - rg.entry.data0
        set_state(rg.bitmap, n, BLKST_UNLINKED if unlinked else BLKST_DINODE)
        self._mark(txn, rg, n, n)

    async def state(self, block: int) -> int:
        index = self.rgrp_index_of(block)
        if index is None:
            raise FormatError(f"block {block} is outside every rgrp")
        rg = await self.rgrp(index)
        return get_state(rg.bitmap, block - rg.entry.data0)

    async def free(self, txn: FsTxn, blocks: list[int], *, dinode: int = 0) -> None:
        """Mark `blocks` FREE (plus dinode block `dinode`, if given)."""
        runs = _runs(sorted(blocks))
        for start, length in runs:
            pos = start
            end = start + length
            while pos < end:
                index = self.rgrp_index_of(pos)
                if index is None:
                    raise FormatError(f"freeing block {pos} outside every rgrp")
                rg = await self._use(txn, index)
                stop = min(end, rg.entry.end)
                n = pos - rg.entry.data0
                if rg.clone is None:
                    rg.clone = bytearray(rg.bitmap)
                _fill(rg.bitmap, n, stop - pos, BLKST_FREE)
                rg.header.free += stop - pos
                if rg.header.flags & RGF_NOALLOC:
                    self.noalloc_free += stop - pos
                self._mark(txn, rg, n, stop - pos - 1 + n)
                txn.freed.update(range(pos, stop))
                pos = stop
        txn.statfs_free += len(blocks)
        self.free_total += len(blocks)
        self.pinned += len(blocks)
        if dinode:
            index = self.rgrp_index_of(dinode)
            if index is None:
                raise FormatError(f"freeing dinode {dinode} outside every rgrp")
            rg = await self._use(txn, index)
            n = dinode - rg.entry.data0
            if get_state(rg.bitmap, n) not in (BLKST_DINODE, BLKST_UNLINKED):
                raise FormatError(f"freeing dinode {dinode} whose bitmap state is not DINODE")
            if rg.clone is None:
                rg.clone = bytearray(rg.bitmap)
            set_state(rg.bitmap, n, BLKST_FREE)
            rg.header.free += 1
            if rg.header.flags & RGF_NOALLOC:
                self.noalloc_free += 1
            rg.header.dinodes -= 1
            self._mark(txn, rg, n, n)
            txn.freed.add(dinode)
            txn.statfs_free += 1
            txn.statfs_dinodes -= 1
            self.free_total += 1
            self.pinned += 1

    async def find_unlinked(self) -> list[int]:
        """Every dinode left UNLINKED (by a crash while it was open)."""
        found = []
        for index in range(len(self.entries)):
            rg = await self.rgrp(index)
            n = 0
            while True:
                hit = find_state(rg.bitmap, BLKST_UNLINKED, n, rg.entry.data)
                if hit is None:
                    break
                found.append(rg.entry.data0 + hit)
                n = hit + 1
        return found

    async def totals(self) -> tuple[int, int, int]:
        """(data blocks, free, dinodes) summed over every rgrp."""
        total = free = dinodes = 0
        for index in range(len(self.entries)):
            rg = await self.rgrp(index)
            total += rg.entry.data
            free += rg.header.free
            dinodes += rg.header.dinodes
        return total, free, dinodes


def _runs(blocks: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for b in blocks:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs


def _free_run(bitmap: bytearray, n: int, limit: int) -> int:
    """Length (<= limit) of the run of FREE blocks starting at free block n."""
    length = 0
    while length < limit and (n + length) & 3:
        if get_state(bitmap, n + length) != BLKST_FREE:
            return length
        length += 1
    if length < limit:
        first_byte = (n + length) >> 2
        last_byte = (n + limit) >> 2
        chunk = bytes(bitmap[first_byte:last_byte])
        zero_bytes = len(chunk) - len(chunk.lstrip(b"\0"))
        length += 4 * zero_bytes
    while length < limit and get_state(bitmap, n + length) == BLKST_FREE:
        length += 1
    return min(length, limit)


_HAS_FREE = bytes(
    1 if any(((value >> (2 * k)) & 3) == BLKST_FREE for k in range(4)) else 0
    for value in range(256)
)


def _find_free(bitmap: bytearray, n: int, ndata: int) -> int | None:
    """First FREE block at or after n, scanning a window of bytes at a time."""
    while n < ndata and n & 3:
        if get_state(bitmap, n) == BLKST_FREE:
            return n
        n += 1
    last = (ndata + 3) >> 2
    index = n >> 2
    window = 512
    while index < last:
        chunk = bytes(bitmap[index : min(last, index + window)]).translate(_HAS_FREE)
        hit = chunk.find(1)
        if hit >= 0:
            byte = index + hit
            for block in range(byte * 4, min(byte * 4 + 4, ndata)):
                if get_state(bitmap, block) == BLKST_FREE:
                    return block
        index += len(chunk)
        window = min(window * 4, 1 << 16)
    return None


def _fill(bitmap: bytearray, n: int, count: int, state: int) -> None:
    """Set blocks n..n+count-1 to `state`, whole bytes at a time where possible."""
    end = n + count
    while n < end and n & 3:
        set_state(bitmap, n, state)
        n += 1
    full = (end - n) >> 2
    if full:
        pattern = state | state << 2 | state << 4 | state << 6
        bitmap[n >> 2 : (n >> 2) + full] = bytes([pattern]) * full
        n += 4 * full
    while n < end:
        set_state(bitmap, n, state)
        n += 1
