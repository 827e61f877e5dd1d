"""A tiny offline writer built only on gfspy.ondisk, for the fsck-oracle tests.

It allocates blocks in the bitmaps, writes structures encoded by our codecs, and
keeps the rgrp headers, master statfs and inum file consistent, so that fsck.gfs2
can judge every byte our encoders produce. It is deliberately simple (no journal,
first-fit allocation): it exists to exercise the codecs, not to be a filesystem.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from gfspy.ondisk import constants as C
from gfspy.ondisk.dinode import Dinode
from gfspy.ondisk.directory import (
    Dirent,
    Leaf,
    hash_index,
    live_dirents,
    pack_dirents,
    pack_hash_table,
    pack_jd_block,
)
from gfspy.ondisk.indirect import block_path, pack_indirect_block, pack_pointers
from gfspy.ondisk.inum import pack_next_inum, unpack_next_inum
from gfspy.ondisk.meta import Inum
from gfspy.ondisk.rgrp import find_state, get_state, pack_rgrp_blocks, set_state
from gfspy.ondisk.statfs import StatfsChange
from gfspy.ondisk.xattr import (
    EARecord,
    ea_is_stuffed,
    ea_num_ptrs,
    pack_ea_block,
    pack_ed_block,
    split_value,
)

from .imagewalk import walk_image

NOW = 1_790_000_000


@dataclass
class Child:
    """A directory entry to create: name -> existing inode."""

    name: bytes
    inum: Inum
    dtype: int


@dataclass
class XattrSpec:
    ea_type: int
    name: bytes
    value: bytes


@dataclass
class Allocation:
    """Blocks allocated for one inode, so di_blocks and the goal come out right."""

    blocks: list[int] = field(default_factory=list)


class ImageEditor:
    def __init__(self, path: Path) -> None:
        self.walk = walk_image(path)
        self.bsize = self.walk.sb.bsize
        self.g = self.walk.geometry
        self.fd = os.open(path, os.O_RDWR)
        self.next_formal = unpack_next_inum(self.walk.files["master/inum"])

    # -- raw blocks and allocation ---------------------------------------------------

    def read(self, number: int) -> bytes:
        return os.pread(self.fd, self.bsize, number * self.bsize)

    def write(self, number: int, data: bytes) -> None:
        assert len(data) == self.bsize
        os.pwrite(self.fd, data, number * self.bsize)

    def alloc(self, state: int, owner: Allocation) -> int:
        """First free data block of the first rgrp with room (like mkfs)."""
        for info in self.walk.rgrps:
            n = find_state(info.bitmap, C.FREE, 0, info.entry.data)
            if n is None:
                continue
            set_state(info.bitmap, n, state)
            info.header.free -= 1
            if state == C.DINODE:
                info.header.dinodes += 1
            owner.blocks.append(info.entry.data0 + n)
            return info.entry.data0 + n
        raise RuntimeError("image full")

    def free(self, block: int) -> None:
        """Return a non-dinode block to the free pool."""
        for info in self.walk.rgrps:
            if info.entry.contains(block):
                n = block - info.entry.data0
                assert get_state(info.bitmap, n) == C.USED, f"block {block} is not USED"
                set_state(info.bitmap, n, C.FREE)
                info.header.free += 1
                return
        raise AssertionError(f"block {block} is in no rgrp")

    def alloc_inum(self, owner: Allocation) -> Inum:
        addr = self.alloc(C.DINODE, owner)
        formal = self.next_formal
        self.next_formal += 1
        return Inum(formal, addr)

    def write_dinode(self, di: Dinode, owner: Allocation, payload: bytes = b"") -> None:
        di.blocks = len(owner.blocks)
        di.goal_meta = di.goal_data = owner.blocks[-1]
        di.atime = di.mtime = di.ctime = NOW
        self.write(di.addr, di.pack_block(self.bsize, payload))

    # -- inode builders --------------------------------------------------------------

    def exhash_dir(
        self,
        inum: Inum,
        owner: Allocation,
        parent: Inum,
        children: list[Child],
        depth: int,
        leaf_bits: int,
    ) -> Dinode:
        """A hashed directory: 2**leaf_bits leaves, a table of 2**depth slots stored
        stuffed or in JD blocks depending on its size."""
        # "." and ".." go last: dirent order is free, and this way a leaf's first
        # record is an ordinary entry that tests can delete (it becomes a sentinel).
        entries = [
            *(Dirent.make(c.name, c.inum, c.dtype) for c in children),
            Dirent.make(b".", inum, C.DT_DIR),
            Dirent.make(b"..", parent, C.DT_DIR),
        ]
        groups: list[list[Dirent]] = [[] for _ in range(1 << leaf_bits)]
        for dirent in entries:
            groups[hash_index(dirent.hash, leaf_bits)].append(dirent)
        leaves = []
        for group in groups:
            addr = self.alloc(C.USED, owner)
            leaf = Leaf(depth=leaf_bits, entries=len(group), inode=inum.addr, dist=1, sec=NOW)
            area = pack_dirents(group, self.bsize - Leaf.SIZE) if group else None
            self.write(addr, leaf.pack_block(self.bsize, area))
            leaves.append(addr)
        table = [leaves[slot >> (depth - leaf_bits)] for slot in range(1 << depth)]
        table_bytes = pack_hash_table(table)
        di = Dinode(
            formal=inum.formal,
            addr=inum.addr,
            mode=0o40755,
            nlink=2 + sum(1 for c in children if c.dtype == C.DT_DIR),
            size=len(table_bytes),
            flags=C.DIF_JDATA | C.DIF_EXHASH,
            depth=depth,
            entries=len(entries),
        )
        di.height = self.g.height_for_size(di.size, is_dir=True)
        if di.height == 0:
            self.write_dinode(di, owner, table_bytes)
            return di
        assert di.height == 1, "test directories keep the table within one pointer level"
        jd_blocks = []
        for pos in range(0, len(table_bytes), self.g.jbsize):
            addr = self.alloc(C.USED, owner)
            self.write(addr, pack_jd_block(self.bsize, table_bytes[pos : pos + self.g.jbsize]))
            jd_blocks.append(addr)
        self.write_dinode(di, owner, pack_pointers(jd_blocks))
        return di

    def big_file(self, inum: Inum, owner: Allocation, size: int, xattrs: list[XattrSpec]) -> Dinode:
        """A regular file with a height >= 2 tree and an EA_INDIRECT xattr set."""
        nblocks = -(-size // self.bsize)
        height = self.g.height_for_size(size)
        assert height == 2, "the test file is meant to need one level of IN blocks"
        top = [0] * self.g.diptrs
        in_blocks: dict[int, list[int]] = {}
        for lblock in range(nblocks):
            first, second = block_path(lblock, height, self.g.inptrs, self.g.diptrs)
            if first not in in_blocks:
                in_blocks[first] = [0] * self.g.inptrs
                top[first] = self.alloc(C.USED, owner)
            data_addr = self.alloc(C.USED, owner)
            in_blocks[first][second] = data_addr
            chunk = (lblock.to_bytes(4, "big") * (self.bsize // 4))[: size - lblock * self.bsize]
            self.write(data_addr, chunk + bytes(self.bsize - len(chunk)))
        for index, ptrs in in_blocks.items():
            self.write(top[index], pack_indirect_block(self.bsize, ptrs))
        di = Dinode(formal=inum.formal, addr=inum.addr, mode=0o100644, size=size, height=height)
        self.add_xattrs(di, owner, xattrs, indirect=True)
        self.write_dinode(di, owner, pack_pointers(top))
        return di

    def small_file(
        self, inum: Inum, owner: Allocation, data: bytes, nlink: int, xattrs: list[XattrSpec]
    ) -> Dinode:
        di = Dinode(formal=inum.formal, addr=inum.addr, mode=0o100600, nlink=nlink, size=len(data))
        self.add_xattrs(di, owner, xattrs, indirect=False)
        self.write_dinode(di, owner, data)
        return di

    def add_xattrs(
        self, di: Dinode, owner: Allocation, xattrs: list[XattrSpec], indirect: bool
    ) -> None:
        """All `xattrs` in one EA block (values unstuffed into ED blocks as needed)."""
        if not xattrs:
            return
        ind_addr = self.alloc(C.USED, owner) if indirect else 0
        ea_addr = self.alloc(C.USED, owner)
        records = []
        for spec in xattrs:
            record = EARecord(0, len(spec.value), len(spec.name), spec.ea_type, name=spec.name)
            if ea_is_stuffed(self.g.jbsize, len(spec.name), len(spec.value)):
                record.value = spec.value
            else:
                record.num_ptrs = ea_num_ptrs(self.g.jbsize, len(spec.value))
                pointers = []
                for chunk in split_value(spec.value, self.g.jbsize):
                    addr = self.alloc(C.USED, owner)
                    self.write(addr, pack_ed_block(self.bsize, chunk))
                    pointers.append(addr)
                record.pointers = tuple(pointers)
            record.rec_len = record.size
            records.append(record)
        used = sum(r.rec_len for r in records[:-1])
        records[-1].rec_len = self.g.jbsize - used
        records[-1].flags |= C.EAFLAG_LAST
        self.write(ea_addr, pack_ea_block(self.bsize, records))
        if indirect:
            self.write(ind_addr, pack_indirect_block(self.bsize, [ea_addr]))
            di.eattr = ind_addr
            di.flags |= C.DIF_EA_INDIRECT
        else:
            di.eattr = ea_addr

    def simple_inode(
        self, inum: Inum, owner: Allocation, mode: int, payload: bytes = b"", **kw
    ) -> Dinode:
        di = Dinode(formal=inum.formal, addr=inum.addr, mode=mode, size=len(payload), **kw)
        self.write_dinode(di, owner, payload)
        return di

    def add_to_root(self, children: list[Child]) -> None:
        """Append dirents to the (stuffed) root directory and fix its counts."""
        root_addr = self.walk.sb.root_dir.addr
        raw = self.read(root_addr)
        root = Dinode.unpack(raw)
        assert root.height == 0 and not root.is_exhash()
        existing = [d for _, d in live_dirents(raw, Dinode.SIZE, self.bsize)]
        entries = existing + [Dirent.make(c.name, c.inum, c.dtype) for c in children]
        root.entries = len(entries)
        root.nlink += sum(1 for c in children if c.dtype == C.DT_DIR)
        area = pack_dirents(entries, self.g.stuffed_size)
        self.write(root_addr, root.pack_block(self.bsize, area))

    # -- finishing ---------------------------------------------------------------------

    def close(self) -> None:
        """Write back rgrps, master statfs and the inum file, then close."""
        for info in self.walk.rgrps:
            blocks = pack_rgrp_blocks(info.header, info.bitmap, self.bsize, info.entry.length)
            for i, block in enumerate(blocks):
                self.write(info.entry.addr + i, block)
        statfs = StatfsChange(
            total=sum(i.entry.data for i in self.walk.rgrps),
            free=sum(i.header.free for i in self.walk.rgrps),
            dinodes=sum(i.header.dinodes for i in self.walk.rgrps),
        )
        self._rewrite_stuffed("master/statfs", statfs.pack())
        self._rewrite_stuffed("master/inum", pack_next_inum(self.next_formal))
        os.fsync(self.fd)
        os.close(self.fd)

    def _rewrite_stuffed(self, path: str, content: bytes) -> None:
        addr = self.walk.paths[path]
        raw = self.read(addr)
        di = Dinode.unpack(raw)
        assert di.height == 0 and di.size == len(content)
        self.write(addr, di.pack_block(self.bsize, content))
