"""Block allocation while mkfs builds the system files, in mkfs.gfs2's order.

mkfs.gfs2 gives every block (dinode, indirect, leaf or data) the lowest free block of
the first resource group that still has a free block, one block at a time, and gives
each journal one contiguous extent at the start of its own rgrp. Following the same
rule puts every system dinode at the same address as mkfs.gfs2 does, which the tests
compare. Nothing is ever freed during mkfs, so each rgrp's free blocks are a suffix and
a cursor replaces bitmap searches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gfspy.ondisk.constants import BLKST_DINODE, BLKST_USED, Geometry

from .geometry import RgrpSpan


class OutOfSpace(Exception):
    """No resource group has a free block left: the device is too small."""


@dataclass(slots=True)
class RgrpUsage:
    """Allocation state of one rgrp: how many leading data blocks are taken, and how."""

    span: RgrpSpan
    used: int = 0
    dinodes: int = 0
    states: bytearray = field(default_factory=bytearray)  # one state per used block

    @property
    def free(self) -> int:
        return self.span.data - self.used

    def bitmap(self) -> bytes:
        """The rgrp's bitmap bytes (ri_bitbytes long), 2 bits per block, LSB first."""
        out = bytearray(self.span.bitbytes)
        for i, state in enumerate(self.states):
            out[i >> 2] |= state << ((i & 3) * 2)
        return bytes(out)


class Allocator:
    """Hands out blocks the way libgfs2 does during mkfs."""

    def __init__(self, rgrps: tuple[RgrpSpan, ...]) -> None:
        self.rgrps = [RgrpUsage(span) for span in rgrps]
        self._cursor = 0  # every rgrp before it is full
        self.blocks_allocated = 0
        self.dinodes_allocated = 0

    def allocate(self, state: int = BLKST_USED) -> int:
        """One block from the first rgrp with room; `state` DINODE or USED."""
        while self._cursor < len(self.rgrps) and self.rgrps[self._cursor].free == 0:
            self._cursor += 1
        if self._cursor == len(self.rgrps):
            raise OutOfSpace("no free block left for the system files")
        rg = self.rgrps[self._cursor]
        block = rg.span.data0 + rg.used
        rg.used += 1
        rg.states.append(state)
        self.blocks_allocated += 1
        if state == BLKST_DINODE:
            rg.dinodes += 1
            self.dinodes_allocated += 1
        return block

    def allocate_dinode(self) -> int:
        return self.allocate(BLKST_DINODE)

    def allocate_extent(self, rg_index: int, count: int) -> int:
        """`count` contiguous blocks at the start of an empty rgrp: a dinode then USED."""
        rg = self.rgrps[rg_index]
        if rg.used or count > rg.span.data:
            raise OutOfSpace(f"resource group at block {rg.span.addr} cannot hold {count} blocks")
        rg.used = count
        rg.states.extend([BLKST_DINODE] + [BLKST_USED] * (count - 1))
        rg.dinodes += 1
        self.blocks_allocated += count
        self.dinodes_allocated += 1
        return rg.span.data0


@dataclass(slots=True)
class BlockTree:
    """A file's metadata tree as libgfs2 grows it: dinode pointers and indirect blocks.

    `indirect` maps each IN block's address to its pointer list; the caller writes the
    blocks. Data blocks are returned by `map_new` and belong to the caller.
    """

    geom: Geometry
    is_dir: bool = False
    height: int = 0
    root: list[int] = field(default_factory=list)  # the dinode's pointers (diptrs long)
    indirect: dict[int, list[int]] = field(default_factory=dict)
    mapped: dict[int, int] = field(default_factory=dict)  # logical -> device block
    last_allocated: int = 0  # becomes di_goal_meta, as libgfs2's meta_alloc records it

    def _alloc(self, alloc: Allocator) -> int:
        block = alloc.allocate()
        self.last_allocated = block
        return block

    def _height_for(self, size: int) -> int:
        return self.geom.height_for_size(size, is_dir=self.is_dir)

    def set_height(self, height: int) -> None:
        """Raise the height of a tree that has no blocks yet (costs no allocation)."""
        if any(self.root):
            raise ValueError("set_height on a tree that already has blocks")
        self.height = max(self.height, height)
        if not self.root:
            self.root = [0] * self.geom.diptrs

    def _grow_to(self, height: int, alloc: Allocator) -> None:
        if not self.root:
            self.root = [0] * self.geom.diptrs
        while self.height < height:
            if any(self.root):
                block = self._alloc(alloc)
                self.indirect[block] = self.root + [0] * (self.geom.inptrs - self.geom.diptrs)
                self.root = [block] + [0] * (self.geom.diptrs - 1)
            self.height += 1

    def map_new(self, lblock: int, alloc: Allocator) -> int:
        """Map logical block `lblock`, allocating it and any indirect block on its path
        that is missing (libgfs2's block_map with create)."""
        if lblock in self.mapped:
            return self.mapped[lblock]
        unit = self.geom.jbsize if self.is_dir else self.geom.bsize
        self._grow_to(max(1, self._height_for((lblock + 1) * unit)), alloc)
        path = []
        rest = lblock
        for _ in range(self.height):
            path.append(rest % self.geom.inptrs)
            rest //= self.geom.inptrs
        path.reverse()
        pointers = self.root
        for level, index in enumerate(path):
            if pointers[index] == 0:
                block = self._alloc(alloc)
                pointers[index] = block
                if level + 1 < self.height:
                    self.indirect[block] = [0] * self.geom.inptrs
            if level + 1 == self.height:
                self.mapped[lblock] = pointers[index]
                return pointers[index]
            pointers = self.indirect[pointers[index]]
        raise AssertionError("unreachable: tree of height 0")

    @property
    def block_count(self) -> int:
        """Indirect blocks in the tree (data blocks are counted by the caller)."""
        return len(self.indirect)


def contiguous_tree(
    geom: Geometry, first: int, data_blocks: int
) -> tuple[int, dict[int, list[int]], list[int]]:
    """Metadata of a file laid out as one extent: dinode at `first`, then the indirect
    blocks level by level, then the data. Returns (height, indirect blocks, root pointers).

    This is how mkfs.gfs2 writes journals, so replay tools see the same mapping.
    """
    height = geom.height_for_size(data_blocks * geom.bsize)
    if height == 0:
        return 0, {}, []
    # Number of pointers needed at each level, from the data up to the dinode.
    level_sizes = [data_blocks]
    while level_sizes[-1] > geom.diptrs:
        level_sizes.append((level_sizes[-1] + geom.inptrs - 1) // geom.inptrs)
    if len(level_sizes) != height:
        raise AssertionError(f"height {height} but {len(level_sizes)} levels")
    # Blocks of each level in breadth-first order: level_sizes[-1] IN blocks hang off the
    # dinode, and so on; data last.
    starts = []
    next_block = first + 1
    for count in reversed(level_sizes[1:]):
        starts.append(next_block)
        next_block += count
    starts.append(next_block)  # data start
    counts = list(reversed(level_sizes[1:])) + [data_blocks]
    root = [starts[0] + i for i in range(counts[0])] + [0] * (geom.diptrs - counts[0])
    indirect: dict[int, list[int]] = {}
    for level in range(len(counts) - 1):
        child_start, child_count = starts[level + 1], counts[level + 1]
        for i in range(counts[level]):
            lo = i * geom.inptrs
            hi = min(lo + geom.inptrs, child_count)
            ptrs = [child_start + k for k in range(lo, hi)]
            indirect[starts[level] + i] = ptrs + [0] * (geom.inptrs - len(ptrs))
    return height, indirect, root
