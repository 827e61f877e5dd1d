"""Adds files to a fresh mkfs.gfs2 image (4 KiB blocks) with gfspy.ondisk encoders, so
the checker meets what mkfs never writes: exhash directories (hash table stuffed and
in JD blocks), leaves and a leaf chain, hard links, height-1 and height-2 files, xattrs (stuffed and
EA-indirect with ED blocks), a symlink, a device node and a subdirectory.

fsck.gfs2 -n accepts the result (the tests check that first), so any complaint from
gfspy-fsck about it is a checker bug. Blocks are taken from the last rgrp, whose tail
mkfs leaves free; bitmaps, rgrp counts and the master statfs are kept exact.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field

from gfspy.ondisk.checksums import name_hash
from gfspy.ondisk.constants import (
    DIF_EA_INDIRECT,
    DIF_EXHASH,
    DIF_JDATA,
    DINODE_SIZE,
    DT_DIR,
    EAFLAG_LAST,
    EATYPE_USR,
    LEAF_HEADER_SIZE,
    META_HEADER_SIZE,
    RG_HEADER_SIZE,
    dt_from_mode,
)
from gfspy.ondisk.dinode import Dinode
from gfspy.ondisk.directory import (
    Dirent,
    Leaf,
    hash_index,
    iter_dirents,
    pack_dirents,
    pack_hash_table,
    pack_jd_block,
)
from gfspy.ondisk.indirect import pack_indirect_block, pack_pointers
from gfspy.ondisk.rgrp import RgrpHeader, pack_rgrp_blocks, set_state
from gfspy.ondisk.statfs import StatfsChange
from gfspy.ondisk.xattr import EARecord, pack_ea_block, pack_ed_block

from .corrupt import Image

NOW = 1_764_000_000


@dataclass
class Populated:
    """Where the interesting objects ended up, for tests that corrupt them."""

    many: int = 0  # exhash dir, stuffed table
    many_leaves: list[int] = field(default_factory=list)
    hashed: int = 0  # exhash dir, table in JD blocks
    hashed_jd: list[int] = field(default_factory=list)
    hashed_chain: int = 0  # a leaf reached only through lf_next
    big: int = 0  # height-2 file
    big_in: list[int] = field(default_factory=list)
    small: int = 0  # height-1 file with a stuffed xattr
    small_data: list[int] = field(default_factory=list)
    eafile: int = 0  # EA_INDIRECT file
    sub: int = 0
    files: dict[bytes, int] = field(default_factory=dict)  # names in "many" -> dinode


class Populator:
    def __init__(self, image: Image) -> None:
        self.im = image
        self.bs = image.bsize
        self.geo = image.geo
        entry = image.rindex()[-1]
        self.entry = entry
        raw = [image.read(entry.addr + k) for k in range(entry.length)]
        self.header = RgrpHeader.unpack(raw[0])
        spans = [RG_HEADER_SIZE] + [META_HEADER_SIZE] * (entry.length - 1)
        bitmap = b"".join(bytes(raw[k][off:]) for k, off in enumerate(spans))
        self.bitmap = bytearray(bitmap[: entry.bitbytes])
        used = self.entry.data - self.header.free
        self.next = entry.data0 + used  # mkfs packs the used blocks at the start
        self.formal = 100
        self.blocks: dict[int, bytes] = {}

    def alloc(self, n: int = 1, dinode: bool = False) -> int:
        start = self.next
        for k in range(n):
            set_state(self.bitmap, start + k - self.entry.data0, 3 if dinode and k == 0 else 1)
        self.next += n
        self.header.free -= n
        if dinode:
            self.header.dinodes += 1
        return start

    def dinode(self, mode: int, **kw: int) -> Dinode:
        addr = self.alloc(dinode=True)
        self.formal += 1
        di = Dinode(formal=self.formal, addr=addr, mode=mode, atime=NOW, mtime=NOW, ctime=NOW)
        di.goal_meta = di.goal_data = addr
        for k, v in kw.items():
            setattr(di, k, v)
        return di

    def put(self, block: int, data: bytes) -> None:
        assert len(data) == self.bs
        self.blocks[block] = data

    def finish(self) -> None:
        for k, data in enumerate(
            pack_rgrp_blocks(self.header, self.bitmap, self.bs, self.entry.length)
        ):
            self.put(self.entry.addr + k, data)
        statfs_addr = self.im.system("statfs")
        block = self.im.read(statfs_addr)
        total = sum(e.data for e in self.im.rindex())
        rgs = self._all_headers()
        sc = StatfsChange(total, sum(h.free for h in rgs), sum(h.dinodes for h in rgs))
        block[DINODE_SIZE : DINODE_SIZE + 24] = sc.pack()
        self.put(statfs_addr, bytes(block))
        for b, data in sorted(self.blocks.items()):
            self.im.write(b, data)

    def _all_headers(self) -> list[RgrpHeader]:
        out = [RgrpHeader.unpack(self.im.read(e.addr)) for e in self.im.rindex()[:-1]]
        return out + [self.header]


def _dirent(name: bytes, di: Dinode) -> Dirent:
    return Dirent.make(name, di.inum, dt_from_mode(di.mode))


def populate(image: Image) -> Populated:
    """Add the objects listed in the module docstring under root."""
    assert image.bsize == 4096, "the layout below assumes 4 KiB blocks"
    p = Populator(image)
    out = Populated()
    bs = p.bs
    root_addr = image.sb.root_dir.addr
    root_block = image.read(root_addr)
    root = Dinode.unpack(root_block)
    root_entries = [d for _, d in iter_dirents(root_block, DINODE_SIZE, bs)]
    new_root_entries: list[Dirent] = []
    subdirs = 0

    def empty_file() -> Dinode:
        di = p.dinode(stat.S_IFREG | 0o644)
        p.put(di.addr, di.pack_block(bs))
        return di

    # 1. "many": 300 files, exhash depth 8 (table stuffed), 16 leaves of depth 4.
    many = p.dinode(stat.S_IFDIR | 0o755, flags=DIF_EXHASH | DIF_JDATA, nlink=2)
    files = [(f"file{i:04d}".encode(), empty_file()) for i in range(300)]
    out.files = {n: d.addr for n, d in files}
    dot = Dirent.make(b".", many.inum, DT_DIR)
    dotdot = Dirent.make(b"..", root.inum, DT_DIR)
    entries = [dot, dotdot] + [_dirent(n, d) for n, d in files]
    leaves = _exhash(p, many, entries, depth=8, leaf_depth=4)
    out.many, out.many_leaves = many.addr, leaves
    many.blocks = 1 + len(leaves)
    p.put(many.addr, many.pack_block(bs, _table(leaves, 8, 4)))
    new_root_entries.append(_dirent(b"many", many))
    subdirs += 1

    # 2. "hashed": depth 10 (8 KiB table in 3 JD blocks, height 1), hard links.
    hashed = p.dinode(stat.S_IFDIR | 0o755, flags=DIF_EXHASH | DIF_JDATA, nlink=2, height=1)
    linked = files[:20]
    entries = [Dirent.make(b".", hashed.inum, DT_DIR), Dirent.make(b"..", root.inum, DT_DIR)]
    entries += [_dirent(b"link-" + n, d) for n, d in linked]
    chain: list[int] = []
    leaves = _exhash(p, hashed, entries, depth=10, leaf_depth=1, chain=chain)
    table = _table(leaves, 10, 1)
    jbsize = p.geo.jbsize
    jd = [p.alloc() for _ in range(-(-len(table) // jbsize))]
    for k, b in enumerate(jd):
        p.put(b, pack_jd_block(bs, table[k * jbsize : (k + 1) * jbsize]))
    out.hashed, out.hashed_jd, out.hashed_chain = hashed.addr, jd, chain[0]
    hashed.blocks = 1 + len(jd) + len(leaves) + len(chain)
    p.put(hashed.addr, hashed.pack_block(bs, pack_pointers(jd)))
    new_root_entries.append(_dirent(b"hashed", hashed))
    subdirs += 1
    for _, d in linked:  # each now has two names
        d.nlink = 2
        p.put(d.addr, d.pack_block(bs))

    # 3. "small": height 1, 5 data blocks, a stuffed user xattr in an EA block.
    small = p.dinode(stat.S_IFREG | 0o600, height=1, size=5 * bs - 100)
    data = [p.alloc() for _ in range(5)]
    for b in data:
        p.put(b, bytes([0x5A]) * bs)
    ea = p.alloc()
    rec = EARecord(bs - META_HEADER_SIZE, 5, 4, EATYPE_USR, EAFLAG_LAST, 0, b"test", b"hello")
    p.put(ea, pack_ea_block(bs, [rec]))
    small.eattr = ea
    small.blocks = 1 + 5 + 1
    small.goal_meta = small.goal_data = ea
    p.put(small.addr, small.pack_block(bs, pack_pointers(data)))
    out.small, out.small_data = small.addr, data
    new_root_entries.append(_dirent(b"small", small))

    # 4. "big": height 2 (600 data blocks behind 2 IN blocks).
    big = p.dinode(stat.S_IFREG | 0o644, height=2, size=600 * bs)
    ins = [p.alloc() for _ in range(2)]
    data = [p.alloc() for _ in range(600)]
    per = p.geo.inptrs
    for k, b in enumerate(ins):
        p.put(b, pack_indirect_block(bs, data[k * per : (k + 1) * per]))
    big.blocks = 1 + 2 + 600
    p.put(big.addr, big.pack_block(bs, pack_pointers(ins)))
    out.big, out.big_in = big.addr, ins
    new_root_entries.append(_dirent(b"big", big))

    # 5. "eafile": EA_INDIRECT -> one EA block -> a 6000-byte value in 2 ED blocks.
    eaf = p.dinode(stat.S_IFREG | 0o600, flags=DIF_EA_INDIRECT)
    ind, eab = p.alloc(), p.alloc()
    eds = [p.alloc(), p.alloc()]
    value = bytes(range(256)) * 24  # 6144 bytes
    for k, b in enumerate(eds):
        p.put(b, pack_ed_block(bs, value[k * jbsize : (k + 1) * jbsize]))
    rec = EARecord(
        bs - META_HEADER_SIZE, len(value), 3, EATYPE_USR, EAFLAG_LAST, 2, b"big", b"", tuple(eds)
    )
    p.put(eab, pack_ea_block(bs, [rec]))
    p.put(ind, pack_indirect_block(bs, [eab]))
    eaf.eattr = ind
    eaf.blocks = 1 + 1 + 1 + 2
    p.put(eaf.addr, eaf.pack_block(bs))
    out.eafile = eaf.addr
    new_root_entries.append(_dirent(b"eafile", eaf))

    # 6. A symlink, a character device, and a linear subdirectory with one file.
    target = b"many/file0001"
    lnk = p.dinode(stat.S_IFLNK | 0o777, size=len(target))
    p.put(lnk.addr, lnk.pack_block(bs, target))
    new_root_entries.append(_dirent(b"link", lnk))
    chr_ = p.dinode(stat.S_IFCHR | 0o600, major=1, minor=3)
    p.put(chr_.addr, chr_.pack_block(bs))
    new_root_entries.append(_dirent(b"null", chr_))
    sub = p.dinode(stat.S_IFDIR | 0o700, flags=DIF_JDATA, nlink=2, size=bs - DINODE_SIZE)
    inner = empty_file()
    sub_entries = [
        Dirent.make(b".", sub.inum, DT_DIR),
        Dirent.make(b"..", root.inum, DT_DIR),
        _dirent(b"inner", inner),
    ]
    sub.entries = 3
    sub.payload_format = 1200
    p.put(sub.addr, sub.pack_block(bs, pack_dirents(sub_entries, bs - DINODE_SIZE)))
    out.sub = sub.addr
    new_root_entries.append(_dirent(b"sub", sub))
    subdirs += 1

    live = [d for d in root_entries if not d.is_sentinel()]
    root.entries = len(live) + len(new_root_entries)
    root.nlink += subdirs
    p.put(root_addr, root.pack_block(bs, pack_dirents(live + new_root_entries, bs - DINODE_SIZE)))
    p.finish()
    return out


def _exhash(
    p: Populator,
    di: Dinode,
    entries: list[Dirent],
    depth: int,
    leaf_depth: int,
    chain: list[int] | None = None,
) -> list[int]:
    """Write 2**leaf_depth leaves holding `entries` by hash; set depth, size, entries.

    With `chain` (a list to fill), the first leaf's second half of entries moves to a
    chained leaf (lf_next), whose block is appended to `chain`.
    """
    bs = p.bs
    groups: list[list[Dirent]] = [[] for _ in range(1 << leaf_depth)]
    for d in entries:
        groups[hash_index(name_hash(d.name), depth) >> (depth - leaf_depth)].append(d)
    leaves = []
    for index, group in enumerate(groups):
        b = p.alloc()
        here, moved = group, []
        nxt = 0
        if chain is not None and index == 0:
            half = len(group) // 2
            here, moved = group[:half], group[half:]
            nxt = p.alloc()
            chained = Leaf(depth=leaf_depth, entries=len(moved), inode=di.addr, dist=2)
            p.put(nxt, chained.pack_block(bs, pack_dirents(moved, bs - LEAF_HEADER_SIZE)))
            chain.append(nxt)
        leaf = Leaf(depth=leaf_depth, entries=len(here), next=nxt, inode=di.addr, dist=1)
        p.put(b, leaf.pack_block(bs, pack_dirents(here, bs - LEAF_HEADER_SIZE)))
        leaves.append(b)
    di.depth = depth
    di.size = 8 << depth
    di.entries = len(entries)
    return leaves


def _table(leaves: list[int], depth: int, leaf_depth: int) -> bytes:
    span = 1 << (depth - leaf_depth)
    return pack_hash_table([leaves[i // span] for i in range(1 << depth)])
