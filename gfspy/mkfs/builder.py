"""The metadata tree of a new filesystem, built in memory in mkfs.gfs2's order.

Given a Layout (geometry.py) this creates, exactly as mkfs.gfs2 does and in the same
order (so every dinode lands on the same block): one journal per journal rgrp, the
master directory, jindex, per_node with inum_rangeN / statfs_changeN / quota_changeN,
inum, statfs, rindex, quota and the root directory (reference §6). The result is a set
of encoded blocks plus descriptions of what is too big to hold in memory (journal log
blocks, rgrp bitmaps); writer.py streams it to the device. No I/O here.
"""

from __future__ import annotations

import random
import stat
import uuid as uuid_mod
from dataclasses import dataclass, field

from gfspy.ondisk.constants import (
    DIF_EXHASH,
    DIF_JDATA,
    DIF_SYSTEM,
    DINODE_SIZE,
    DT_DIR,
    DT_REG,
    FORMAT_DE,
    FORMAT_QU,
    FORMAT_RI,
    INUM_RANGE_SIZE,
    RINDEX_ENTRY_SIZE,
    STATFS_CHANGE_SIZE,
    Geometry,
)
from gfspy.ondisk.dinode import Dinode
from gfspy.ondisk.indirect import pack_indirect_block, pack_pointers
from gfspy.ondisk.inum import pack_next_inum
from gfspy.ondisk.meta import Inum
from gfspy.ondisk.quota import QuotaEntry, pack_qc_block
from gfspy.ondisk.rgrp import RgrpHeader, RindexEntry, pack_rgrp_blocks
from gfspy.ondisk.statfs import StatfsChange
from gfspy.ondisk.superblock import Superblock

from .alloc import Allocator, BlockTree, contiguous_tree
from .dirs import Directory
from .geometry import Layout, RgrpSpan


@dataclass(slots=True)
class JournalPlan:
    """Where journal j lives and how its log blocks are to be written."""

    index: int
    inum: Inum
    log_start: int  # device block of journal block 0
    log_blocks: int
    start_seq: int


@dataclass(slots=True)
class _Inode:
    """A system inode being built: its dinode fields and where its content lives."""

    dinode: Dinode
    payload: bytes = b""  # bytes after the dinode header (stuffed data or pointers)
    tree: BlockTree | None = None
    directory: Directory | None = None
    data_blocks: dict[int, bytes] = field(default_factory=dict)

    @property
    def inum(self) -> Inum:
        return Inum(self.dinode.formal, self.dinode.addr)


@dataclass(slots=True)
class MkfsOptions:
    lockproto: str = "lock_dlm"
    locktable: str = ""
    uuid: uuid_mod.UUID | None = None
    qc_mb: int = 1
    now: int = 0
    seed: int | None = None  # journal sequence starts; None = random


@dataclass(slots=True)
class BuiltFilesystem:
    """Everything writer.py needs; `blocks` are encoded metadata blocks by address."""

    layout: Layout
    superblock: Superblock
    blocks: dict[int, bytes]
    journals: list[JournalPlan]
    allocator: Allocator
    system_inodes: dict[str, Inum]  # "master", "jindex", "journal0", "per_node/quota_change0"...

    def rgrp_blocks(self, index: int) -> bytes:
        """Header block and bitmap blocks of rgrp `index`, ready for one write."""
        usage = self.allocator.rgrps[index]
        return encode_rgrp(self.layout.bsize, usage.span, usage.free, usage.dinodes, usage.bitmap())


def encode_rgrp(bsize: int, span: RgrpSpan, free: int, dinodes: int, bitmap: bytes) -> bytes:
    """RG block + RB blocks of an rgrp whose bitmap bytes are `bitmap`."""
    header = RgrpHeader(
        free=free,
        dinodes=dinodes,
        skip=span.skip,
        data0=span.data0,
        data=span.data,
        bitbytes=span.bitbytes,
    )
    return b"".join(pack_rgrp_blocks(header, bitmap, bsize, span.length))


class _Builder:
    def __init__(self, layout: Layout, opts: MkfsOptions) -> None:
        self.layout = layout
        self.opts = opts
        self.geom = Geometry.for_bsize(layout.bsize)
        self.alloc = Allocator(layout.rgrps)
        self.next_formal = 1
        self.inodes: list[_Inode] = []
        self.named: dict[str, _Inode] = {}
        self.rng = random.Random(opts.seed)

    # ---- inode creation ---------------------------------------------------------------

    def _take_formal(self) -> int:
        formal = self.next_formal
        self.next_formal += 1
        return formal

    def _new_inode(self, addr: int, mode: int, flags: int, label: str) -> _Inode:
        now = self.opts.now
        dinode = Dinode(
            formal=self._take_formal(),
            addr=addr,
            mode=mode,
            atime=now,
            mtime=now,
            ctime=now,
            goal_meta=addr,
            goal_data=addr,
            flags=flags,
        )
        inode = _Inode(dinode)
        self.inodes.append(inode)
        self.named[label] = inode
        return inode

    def _make_dir(self, inode: _Inode, parent: Inum) -> None:
        inode.dinode.flags |= DIF_JDATA
        inode.dinode.nlink = 2
        inode.directory = Directory(
            self.geom, inode.dinode.addr, inode.dinode.formal, (parent.formal, parent.addr)
        )

    def _create(self, parent: _Inode, name: str, mode: int, flags: int, label: str) -> _Inode:
        """Allocate a dinode and link it into `parent`, as libgfs2's createi does."""
        inode = self._new_inode(self.alloc.allocate_dinode(), mode, flags, label)
        is_dir = stat.S_ISDIR(mode)
        if is_dir:
            self._make_dir(inode, parent.inum)
            parent.dinode.nlink += 1
        assert parent.directory is not None
        parent.directory.add(
            name.encode(),
            inode.dinode.formal,
            inode.dinode.addr,
            DT_DIR if is_dir else DT_REG,
            self.alloc,
        )
        return inode

    def _write_data(self, inode: _Inode, data: bytes, scratch: int = 0) -> None:
        """Give a new regular file its contents, stuffed or through a block tree.

        `scratch` zero bytes are written after the data without counting in di_size:
        mkfs.gfs2 does that to rindex, which can unstuff it or give it one more block.
        """
        inode.dinode.size = len(data)
        if len(data) + scratch <= self.geom.bsize - DINODE_SIZE:
            inode.payload = data
            return
        data += bytes(scratch)
        tree = BlockTree(self.geom)
        bsize = self.geom.bsize
        for lblock in range((len(data) + bsize - 1) // bsize):
            block = tree.map_new(lblock, self.alloc)
            chunk = data[lblock * bsize : (lblock + 1) * bsize]
            inode.data_blocks[block] = chunk + bytes(bsize - len(chunk))
        inode.tree = tree

    # ---- the build sequence -------------------------------------------------------------

    def build(self) -> BuiltFilesystem:
        layout, geom = self.layout, self.geom
        journals = self._place_journals()

        master = self._new_inode(
            self.alloc.allocate_dinode(), stat.S_IFDIR | 0o755, DIF_SYSTEM, "master"
        )
        self._make_dir(master, master.inum)

        jindex = self._create(master, "jindex", stat.S_IFDIR | 0o700, DIF_SYSTEM, "jindex")
        assert jindex.directory is not None
        for plan in journals:
            jindex.directory.add(
                f"journal{plan.index}".encode(),
                plan.inum.formal,
                plan.inum.addr,
                DT_REG,
                self.alloc,
            )

        per_node = self._create(master, "per_node", stat.S_IFDIR | 0o700, DIF_SYSTEM, "per_node")
        qc_blocks = (self.opts.qc_mb << 20) // geom.bsize
        for j in range(layout.journals):
            reg = stat.S_IFREG | 0o600
            ir = self._create(
                per_node, f"inum_range{j}", reg, DIF_SYSTEM | DIF_JDATA, f"per_node/inum_range{j}"
            )
            ir.dinode.size = INUM_RANGE_SIZE
            ir.payload = bytes(INUM_RANGE_SIZE)
            sc = self._create(
                per_node,
                f"statfs_change{j}",
                reg,
                DIF_SYSTEM | DIF_JDATA,
                f"per_node/statfs_change{j}",
            )
            sc.dinode.size = STATFS_CHANGE_SIZE
            sc.payload = bytes(STATFS_CHANGE_SIZE)
            qc = self._create(
                per_node, f"quota_change{j}", reg, DIF_SYSTEM, f"per_node/quota_change{j}"
            )
            self._fill_quota_change(qc, qc_blocks)

        reg = stat.S_IFREG | 0o600
        inum_file = self._create(master, "inum", reg, DIF_SYSTEM | DIF_JDATA, "inum")
        statfs_file = self._create(master, "statfs", reg, DIF_SYSTEM | DIF_JDATA, "statfs")
        rindex = self._create(master, "rindex", reg, DIF_SYSTEM | DIF_JDATA, "rindex")
        rindex.dinode.payload_format = FORMAT_RI
        entries = b"".join(
            RindexEntry(rg.addr, rg.length, rg.data0, rg.data, rg.bitbytes).pack()
            for rg in layout.rgrps
        )
        self._write_data(rindex, entries, scratch=RINDEX_ENTRY_SIZE)
        quota = self._create(master, "quota", reg, DIF_SYSTEM | DIF_JDATA, "quota")
        quota.dinode.payload_format = FORMAT_QU
        root_usage = QuotaEntry(value=1).pack()
        self._write_data(quota, root_usage * 2)  # uid 0 and gid 0 each own one block

        root = self._new_inode(self.alloc.allocate_dinode(), stat.S_IFDIR | 0o755, 0, "root")
        self._make_dir(root, root.inum)

        self._write_data(inum_file, pack_next_inum(self.next_formal))
        total = layout.data_blocks
        self._write_data(
            statfs_file,
            StatfsChange(
                total, total - self.alloc.blocks_allocated, self.alloc.dinodes_allocated
            ).pack(),
        )

        sb = Superblock(
            bsize=geom.bsize,
            bsize_shift=geom.bsize_shift,
            master_dir=master.inum,
            root_dir=root.inum,
            lockproto=self.opts.lockproto,
            locktable=self.opts.locktable,
            uuid=self.opts.uuid or uuid_mod.uuid4(),
        )
        blocks: dict[int, bytes] = {}
        for inode in self.inodes:
            self._encode(inode, blocks)
        return BuiltFilesystem(
            layout=layout,
            superblock=sb,
            blocks=blocks,
            journals=journals,
            allocator=self.alloc,
            system_inodes={label: inode.inum for label, inode in self.named.items()},
        )

    def _place_journals(self) -> list[JournalPlan]:
        plans = []
        nbytes = self.layout.journal_mb << 20
        log_blocks = nbytes // self.geom.bsize
        for j in range(self.layout.journals):
            addr = self.alloc.allocate_extent(j, self.layout.journal_file_blocks)
            inode = self._new_inode(addr, stat.S_IFREG | 0o600, DIF_SYSTEM, f"journal{j}")
            height, indirect, root = contiguous_tree(self.geom, addr, log_blocks)
            tree = BlockTree(self.geom, height=height, root=root, indirect=indirect)
            inode.tree = tree
            f = inode.dinode
            f.size = nbytes
            f.blocks = self.layout.journal_file_blocks
            f.goal_data = addr + f.blocks - 1
            f.goal_meta = f.goal_data - log_blocks
            log_start = addr + 1 + len(indirect)
            start_seq = self.rng.randrange(log_blocks)
            plans.append(JournalPlan(j, inode.inum, log_start, log_blocks, start_seq))
        return plans

    def _fill_quota_change(self, qc: _Inode, blocks: int) -> None:
        bsize = self.geom.bsize
        tree = BlockTree(self.geom)
        tree.set_height(self.geom.height_for_size((blocks + 1) * bsize))
        header = pack_qc_block(bsize)
        for lblock in range(blocks):
            qc.data_blocks[tree.map_new(lblock, self.alloc)] = header
        qc.tree = tree
        qc.dinode.size = blocks * bsize

    # ---- encoding -----------------------------------------------------------------------

    def _encode(self, inode: _Inode, out: dict[int, bytes]) -> None:
        f = inode.dinode
        bsize = self.geom.bsize
        payload = inode.payload
        if inode.directory is not None:
            d = inode.directory
            f.size = d.size
            f.entries = d.entries
            f.blocks = d.block_count
            f.height = d.height
            f.goal_meta = d.last_allocated
            if d.hashed:
                f.flags |= DIF_EXHASH
                f.depth = d.depth
                f.payload_format = 0
            else:
                f.payload_format = FORMAT_DE
            payload = d.payload()
            out.update(d.leaf_blocks())
            out.update(d.table_blocks())
        elif inode.tree is not None:
            tree = inode.tree
            f.height = tree.height
            payload = pack_pointers(tree.root)
            for block, pointers in tree.indirect.items():
                out[block] = pack_indirect_block(bsize, pointers)
            if inode.data_blocks:  # journals count their blocks up front
                f.blocks = 1 + tree.block_count + len(inode.data_blocks)
                f.goal_meta = tree.last_allocated
            out.update(inode.data_blocks)
        out[f.addr] = f.pack_block(bsize, payload)


def build_filesystem(layout: Layout, opts: MkfsOptions) -> BuiltFilesystem:
    """Lay out and encode every system inode of a new filesystem (no I/O)."""
    return _Builder(layout, opts).build()
