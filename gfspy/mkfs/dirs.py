"""System directories as mkfs.gfs2 grows them: stuffed first, hashed when full.

With small blocks (or many journals) master, jindex and per_node outgrow the dinode
and become exhash directories. To land every later dinode where mkfs.gfs2 puts it, the
directory must overflow, convert and split leaves at the same moments, so this module
follows libgfs2's placement rules (first-fit dirent slots, a deleted first dirent left
as an unused sentinel, the new leaf taking the lower half of a split range, the hash
table doubled and moved into JD blocks when a leaf at full depth overflows). What it
writes is ordinary GFS2 (reference §4): fsck.gfs2 checks it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gfspy.ondisk.checksums import name_hash
from gfspy.ondisk.constants import (
    DINODE_SIZE,
    DIR_MAX_DEPTH,
    LEAF_HEADER_SIZE,
    Geometry,
)
from gfspy.ondisk.directory import Dirent, Leaf, dirent_size, pack_hash_table, pack_jd_block
from gfspy.ondisk.indirect import pack_indirect_block, pack_pointers
from gfspy.ondisk.meta import Inum

from .alloc import Allocator, BlockTree


class DirectoryTooLarge(Exception):
    """A system directory would need chained leaves beyond the deepest hash table
    (depth 17): far more journals than any cluster has; not supported."""


@dataclass(slots=True, eq=False)  # slots are compared by identity when removed
class _Slot:
    """One directory entry slot; formal == 0 marks an unused slot (a sentinel)."""

    name: bytes
    formal: int
    addr: int
    de_type: int
    rec_len: int
    hash: int = 0

    @property
    def used(self) -> bool:
        return self.formal != 0

    @property
    def size(self) -> int:
        return dirent_size(len(self.name))


@dataclass(slots=True)
class _Leaf:
    depth: int
    entries: int = 0
    dirents: list[_Slot] = field(default_factory=list)


def _find_slot(dirents: list[_Slot], entries: int, region: int, name_len: int) -> int | None:
    """Index of the slot a new `name_len` entry goes into (splitting slack), or None.

    An empty container is reset to one slot covering the whole region.
    """
    need = dirent_size(name_len)
    if entries == 0:
        dirents[:] = [_Slot(b"", 0, 0, 0, region)]
        return 0
    for i, dent in enumerate(dirents):
        fits_unused = not dent.used and dent.rec_len >= need
        if fits_unused or dent.rec_len >= dent.size + need:
            if dent.used:
                tail = _Slot(b"", 0, 0, 0, dent.rec_len - dent.size)
                dent.rec_len = dent.size
                dirents.insert(i + 1, tail)
                return i + 1
            return i
    return None


class Directory:
    """Entries of one system directory and, once hashed, its table and leaves."""

    def __init__(self, geom: Geometry, addr: int, self_formal: int, parent: tuple[int, int]):
        self.geom = geom
        self.addr = addr
        region = geom.bsize - DINODE_SIZE
        dot = _Slot(b".", self_formal, addr, 4, dirent_size(1), name_hash(b"."))
        dotdot = _Slot(b"..", parent[0], parent[1], 4, region - dot.rec_len, name_hash(b".."))
        self.linear: list[_Slot] | None = [dot, dotdot]
        self.entries = 2
        self.depth = 0
        self.table: list[int] = []
        self.leaves: dict[int, _Leaf] = {}
        self.table_tree: BlockTree | None = None  # once the hash table leaves the dinode
        self.last_allocated = addr

    @property
    def hashed(self) -> bool:
        return self.linear is None

    def add(self, name: bytes, formal: int, addr: int, de_type: int, alloc: Allocator) -> None:
        """Add an entry, converting to a hashed directory or splitting leaves as needed."""
        if self.linear is not None:
            region = self.geom.bsize - DINODE_SIZE
            slot = _find_slot(self.linear, self.entries, region, len(name))
            if slot is not None:
                self._fill(self.linear[slot], name, formal, addr, de_type)
                self.entries += 1
                return
            self._make_hashed(alloc)
        self._hashed_add(name, formal, addr, de_type, alloc)

    @staticmethod
    def _fill(dent: _Slot, name: bytes, formal: int, addr: int, de_type: int) -> None:
        dent.name, dent.formal, dent.addr, dent.de_type = name, formal, addr, de_type
        dent.hash = name_hash(name)

    def _allocate_leaf(self, alloc: Allocator) -> int:
        block = alloc.allocate()
        self.last_allocated = block
        return block

    def _make_hashed(self, alloc: Allocator) -> None:
        assert self.linear is not None
        block = self._allocate_leaf(alloc)
        dirents = self.linear
        # The leaf's dirent area starts 128 bytes earlier than the dinode's; the last
        # entry absorbs the difference so the chain still ends at the block end.
        dirents[-1].rec_len += DINODE_SIZE - LEAF_HEADER_SIZE
        self.leaves[block] = _Leaf(depth=0, entries=self.entries, dirents=dirents)
        self.linear = None
        self.table = [block] * self.geom.hash_ptrs
        self.depth = self.geom.hash_ptrs.bit_length() - 1

    def _hashed_add(
        self, name: bytes, formal: int, addr: int, de_type: int, alloc: Allocator
    ) -> None:
        region = self.geom.bsize - LEAF_HEADER_SIZE
        h = name_hash(name)
        while True:
            index = h >> (32 - self.depth)
            leaf_addr = self.table[index]
            leaf = self.leaves[leaf_addr]
            slot = _find_slot(leaf.dirents, leaf.entries, region, len(name))
            if slot is not None:
                self._fill(leaf.dirents[slot], name, formal, addr, de_type)
                leaf.entries += 1
                self.entries += 1
                return
            if leaf.depth < self.depth:
                span = 1 << (self.depth - leaf.depth)
                self._split(index & ~(span - 1), leaf_addr, alloc)
                continue
            if self.depth < DIR_MAX_DEPTH:
                self._double_table(alloc)
                continue
            raise DirectoryTooLarge(f"directory at block {self.addr} needs chained leaves")

    def _double_table(self, alloc: Allocator) -> None:
        """Double the hash table (every pointer twice), moving it out of the dinode
        into JD blocks when it no longer fits, in the order libgfs2 writes it: the table
        is rewritten in half-block pieces from the last piece down."""
        geom = self.geom
        old_size = 8 * len(self.table)
        self.table = [block for block in self.table for _ in range(2)]
        if self.table_tree is None and 2 * old_size > geom.bsize - DINODE_SIZE:
            self.table_tree = BlockTree(geom, is_dir=True)
            self._map_table_block(0, alloc)  # unstuffing copies the old table first
        if self.table_tree is not None:
            piece = geom.bsize // 2
            for index in reversed(range(old_size // piece)):
                start = index * geom.bsize
                for lblock in range(
                    start // geom.jbsize, (start + geom.bsize - 1) // geom.jbsize + 1
                ):
                    self._map_table_block(lblock, alloc)
        self.depth += 1

    def _map_table_block(self, lblock: int, alloc: Allocator) -> None:
        assert self.table_tree is not None
        before = self.table_tree.last_allocated
        self.table_tree.map_new(lblock, alloc)
        if self.table_tree.last_allocated != before:
            self.last_allocated = self.table_tree.last_allocated

    def _split(self, start: int, old_addr: int, alloc: Allocator) -> None:
        region = self.geom.bsize - LEAF_HEADER_SIZE
        new_addr = self._allocate_leaf(alloc)
        old = self.leaves[old_addr]
        new = _Leaf(depth=0)
        span = 1 << (self.depth - old.depth)
        half = span >> 1
        for i in range(start, start + half):
            self.table[i] = new_addr
        divider = ((start + half) << (32 - self.depth)) & 0xFFFFFFFF
        prev: _Slot | None = None
        moved = False
        for dent in list(old.dirents):
            if dent.used and dent.hash < divider:
                slot = _find_slot(new.dirents, new.entries, region, len(dent.name))
                if slot is None:
                    raise AssertionError("split leaf cannot hold the moved entries")
                target = new.dirents[slot]
                self._fill(target, dent.name, dent.formal, dent.addr, dent.de_type)
                new.entries += 1
                old.entries -= 1
                if prev is None:
                    dent.formal = dent.addr = 0  # the first slot stays, as a sentinel
                    prev = dent
                else:
                    prev.rec_len += dent.rec_len
                    old.dirents.remove(dent)
                moved = True
            else:
                prev = dent
        if not moved:
            new.dirents = [_Slot(b"", 0, 0, 0, region)]
        old.depth += 1
        new.depth = old.depth
        self.leaves[new_addr] = new

    # ---- encoding -------------------------------------------------------------------

    @property
    def size(self) -> int:
        """di_size: the stuffed dirent area, or the hash table in bytes."""
        if self.linear is not None:
            return self.geom.bsize - DINODE_SIZE
        return 8 * len(self.table)

    @property
    def height(self) -> int:
        return 0 if self.table_tree is None else self.table_tree.height

    @property
    def block_count(self) -> int:
        """di_blocks: the dinode, leaves, and the hash table's JD and indirect blocks."""
        count = 1 + len(self.leaves)
        if self.table_tree is not None:
            count += len(self.table_tree.mapped) + len(self.table_tree.indirect)
        return count

    def _table_bytes(self) -> bytes:
        return pack_hash_table(self.table)

    def payload(self) -> bytes:
        """What follows the dinode header: dirents, the hash table, or its pointers."""
        if self.linear is not None:
            return _pack_dirents(self.linear, self.geom.bsize - DINODE_SIZE)
        if self.table_tree is None:
            return self._table_bytes()
        return pack_pointers(self.table_tree.root)

    def table_blocks(self) -> dict[int, bytes]:
        """JD and indirect blocks of a hash table that left the dinode."""
        tree = self.table_tree
        if tree is None:
            return {}
        out = {}
        table = self._table_bytes()
        jb = self.geom.jbsize
        for lblock, block in tree.mapped.items():
            out[block] = pack_jd_block(self.geom.bsize, table[lblock * jb : (lblock + 1) * jb])
        for block, pointers in tree.indirect.items():
            out[block] = pack_indirect_block(self.geom.bsize, pointers)
        return out

    def leaf_blocks(self) -> dict[int, bytes]:
        """Encoded leaf blocks by address."""
        out = {}
        region = self.geom.bsize - LEAF_HEADER_SIZE
        for block, slots in self.leaves.items():
            # lf_dist 0 and no timestamp, as mkfs.gfs2 writes its leaves.
            header = Leaf(depth=slots.depth, entries=slots.entries, inode=self.addr, dist=0)
            out[block] = header.pack_block(self.geom.bsize, _pack_dirents(slots.dirents, region))
        return out


def _pack_dirents(slots: list[_Slot], region: int) -> bytes:
    """Encode slots back to back with their own rec_len (slack stays where it is)."""
    buf = bytearray(region)
    offset = 0
    for slot in slots:
        if slot.used:
            dirent = Dirent(
                Inum(slot.formal, slot.addr),
                slot.hash,
                slot.rec_len,
                len(slot.name),
                slot.de_type,
                0,
                slot.name,
            )
        else:
            dirent = Dirent.sentinel(slot.rec_len)
        dirent.pack_into(buf, offset)
        offset += slot.rec_len
    if offset != region:
        raise AssertionError(f"dirents cover {offset} of {region} bytes")
    return bytes(buf)
