"""Walk a whole GFS2 image through gfspy.ondisk, for the round-trip tests.

Starting from the superblock, the walker decodes every block reachable from the
master and root directories (dinodes, IN blocks, JD blocks, leaves, EA/ED blocks,
journal headers, quota_change blocks, system-file contents), then the rindex and every
rgrp header and bitmap block. Each block is re-encoded with the ondisk API and must
come out byte-identical, except for bytes the format reference calls garbage. The
walker also builds its own map of which blocks are in use and compares it with the
bitmaps, which proves it really reached every allocated block.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from gfspy.ondisk import constants as C
from gfspy.ondisk.checksums import name_hash
from gfspy.ondisk.dinode import Dinode
from gfspy.ondisk.directory import (
    Dirent,
    Leaf,
    iter_dirents,
    jd_payload,
    pack_dirents,
    pack_hash_table,
    pack_jd_block,
    unpack_hash_table,
)
from gfspy.ondisk.indirect import (
    pack_indirect_block,
    pack_pointers,
    unpack_indirect_block,
    unpack_pointers,
)
from gfspy.ondisk.inum import InumRange, pack_next_inum, unpack_next_inum
from gfspy.ondisk.journal import LogHeader
from gfspy.ondisk.meta import Inum
from gfspy.ondisk.quota import QuotaEntry, pack_qc_block, unpack_qc_block
from gfspy.ondisk.rgrp import (
    RgrpBitmapHeader,
    RgrpHeader,
    RindexEntry,
    count_states,
    extract_bitmap,
    pack_rgrp_blocks,
    set_state,
    unpack_rindex,
)
from gfspy.ondisk.statfs import StatfsChange
from gfspy.ondisk.superblock import Superblock
from gfspy.ondisk.xattr import (
    ed_payload,
    iter_ea_records,
    pack_ea_block,
    pack_ed_block,
)

# Byte ranges the reference says hold garbage in mkfs output (never compared).
RINDEX_GARBAGE = ((12, 16), (32, 96))
DIRENT_GARBAGE = ((28, 40),)


def assert_same(raw: bytes, packed: bytes, what: str, ignore: tuple = ()) -> None:
    """Fail with the first differing offset unless `packed` equals `raw` outside
    the `ignore` ranges."""
    assert len(raw) == len(packed), f"{what}: length {len(packed)} != on-disk {len(raw)}"
    if ignore:
        raw_masked, packed_masked = bytearray(raw), bytearray(packed)
        for start, end in ignore:
            raw_masked[start:end] = bytes(end - start)
            packed_masked[start:end] = bytes(end - start)
        raw, packed = bytes(raw_masked), bytes(packed_masked)
    if raw != packed:
        first = next(i for i, (a, b) in enumerate(zip(raw, packed, strict=True)) if a != b)
        raise AssertionError(
            f"{what}: re-encoding differs at byte {first}: "
            f"disk {raw[first : first + 16].hex()} vs ours {packed[first : first + 16].hex()}"
        )


@dataclass
class RgrpInfo:
    entry: RindexEntry
    header: RgrpHeader
    bitmap: bytearray


@dataclass
class WalkResult:
    """What the walker found, for tests to assert on."""

    sb: Superblock
    geometry: C.Geometry
    dinodes: dict[int, Dinode] = field(default_factory=dict)
    paths: dict[str, int] = field(default_factory=dict)
    claimed: dict[int, int] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    rgrps: list[RgrpInfo] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    journal_heads: dict[str, LogHeader] = field(default_factory=dict)
    journal_blocks: dict[str, list[int]] = field(default_factory=dict)
    links: Counter[int] = field(default_factory=Counter)


class ImageWalker:
    """Reads blocks with pread and checks each structure as it goes."""

    def __init__(self, path: Path, strict_layout: bool = True) -> None:
        self.path = path
        # mkfs packs dirents tightly; images written by other tools need not.
        self.strict_layout = strict_layout
        self.fd = os.open(path, os.O_RDONLY)
        raw = os.pread(self.fd, C.SB_SIZE, C.SB_OFFSET)
        sb = Superblock.unpack(raw)
        self.bsize = sb.bsize
        self.result = WalkResult(sb, C.Geometry.for_bsize(sb.bsize))
        self.g = self.result.geometry

    def close(self) -> None:
        os.close(self.fd)

    def block(self, number: int) -> bytes:
        raw = os.pread(self.fd, self.bsize, number * self.bsize)
        assert len(raw) == self.bsize, f"block {number} is beyond the image"
        return raw

    def claim(self, number: int, state: int, what: str) -> None:
        previous = self.result.claimed.get(number)
        assert previous is None, f"block {number} ({what}) is referenced twice"
        self.result.claimed[number] = state
        self.result.counts[what] += 1

    # -- top level -------------------------------------------------------------------

    def walk(self) -> WalkResult:
        res = self.result
        raw = self.block(self.g.sb_block)
        assert_same(raw, res.sb.pack_block(), "superblock")
        res.counts["SB"] += 1
        self.visit_dinode(res.sb.master_dir, "master", parent=res.sb.master_dir)
        self.visit_dinode(res.sb.root_dir, "root", parent=res.sb.root_dir)
        self.check_link_counts()
        self.check_rgrps(res.files["master/rindex"])
        self.check_bitmaps_match_claims()
        return res

    # -- dinodes and their trees -----------------------------------------------------

    def visit_dinode(self, inum: Inum, path: str, parent: Inum) -> None:
        res = self.result
        res.links[inum.addr] += 1
        if inum.addr in res.dinodes:  # another hard link to an inode already checked
            known = res.dinodes[inum.addr]
            assert known.formal == inum.formal, f"{path}: formal number differs"
            assert not known.is_dir(), f"{path}: hard link to a directory"
            return
        raw = self.block(inum.addr)
        di = Dinode.unpack(raw)
        assert_same(raw[: Dinode.SIZE], di.pack(), f"dinode {path}")
        assert di.addr == inum.addr and di.formal == inum.formal, f"{path}: inum mismatch"
        assert di.has_valid_type(), f"{path}: bad mode {di.mode:o}"
        self.claim(inum.addr, C.DINODE, "DI")
        res.dinodes[inum.addr] = di
        res.paths[path] = inum.addr
        owned = 1
        data_blocks, tree_blocks = self.walk_tree(raw, di, path)
        owned += tree_blocks + sum(1 for ptr in data_blocks if ptr)
        if di.is_dir():
            assert di.is_jdata(), f"{path}: directory without JDATA"
            owned += self.visit_directory(raw, di, data_blocks, path, parent)
        else:
            self.visit_file(raw, di, data_blocks, path)
        if di.eattr:
            owned += self.visit_eattr(di, path)
        assert di.blocks == owned, f"{path}: di_blocks {di.blocks}, walker counted {owned}"

    def walk_tree(self, raw: bytes, di: Dinode, path: str) -> tuple[list[int], int]:
        """(data block pointers in logical order, number of IN blocks)."""
        if di.height == 0:
            return [], 0
        payload = bytes(Dinode.payload(raw))
        level = unpack_pointers(payload, 0, self.g.diptrs)
        assert_same(payload, pack_pointers(level), f"{path}: dinode pointer area")
        in_blocks = 0
        for _depth in range(di.height - 1):
            below: list[int] = []
            for ptr in level:
                if not ptr:
                    continue
                block = self.block(ptr)
                ptrs = unpack_indirect_block(block)
                assert len(ptrs) == self.g.inptrs
                assert_same(block, pack_indirect_block(self.bsize, ptrs), f"{path}: IN {ptr}")
                self.claim(ptr, C.USED, "IN")
                in_blocks += 1
                below.extend(ptrs)
            level = below
        # mkfs may build a taller tree than needed (rindex on 512-byte blocks), never
        # a shorter one.
        minimum = self.g.height_for_size(di.size, di.is_dir())
        assert di.height >= minimum, f"{path}: height {di.height} for size {di.size}"
        unit = self.g.jbsize if di.is_dir() else self.bsize
        nblocks = -(-di.size // unit)
        assert not any(level[nblocks:]), f"{path}: pointers beyond the file size"
        return level[:nblocks], in_blocks

    def file_bytes(self, raw: bytes, di: Dinode, data_blocks: list[int], what: str) -> bytes:
        """Contents of a file whose data blocks are raw (regular and JDATA files)."""
        if di.height == 0:
            payload = bytes(Dinode.payload(raw))
            assert payload[di.size :] == bytes(len(payload) - di.size), f"{what}: stuffed tail"
            return payload[: di.size]
        chunks = []
        for ptr in data_blocks:
            if ptr:
                self.claim(ptr, C.USED, "data")
                chunks.append(self.block(ptr))
        return b"".join(chunks)[: di.size]

    def check_link_counts(self) -> None:
        """nlink = names for files; 2 + subdirectories for directories (whose own
        ".." is not walked as a link)."""
        res = self.result
        subdirs: Counter[int] = Counter()
        for path, addr in res.paths.items():
            if "/" in path and res.dinodes[addr].is_dir():
                subdirs[res.paths[path.rsplit("/", 1)[0]]] += 1
        for addr, di in res.dinodes.items():
            expected = 2 + subdirs[addr] if di.is_dir() else res.links[addr]
            assert di.nlink == expected, f"inode {addr}: nlink {di.nlink}, expected {expected}"

    # -- regular (system) files --------------------------------------------------------

    def visit_file(self, raw: bytes, di: Dinode, data_blocks: list[int], path: str) -> None:
        res = self.result
        name = path.rsplit("/", 1)[-1]
        if path.startswith("master/jindex/journal"):
            self.visit_journal(di, data_blocks, path)
            return
        if path.startswith("master/per_node/quota_change"):
            for ptr in data_blocks:
                block = self.block(ptr)
                records = unpack_qc_block(block)
                assert len(records) == self.g.qc_per_block
                assert_same(block, pack_qc_block(self.bsize, records), f"{path}: QC {ptr}")
                assert all(r.pack() == bytes(16) for r in records), f"{path}: non-zero QC"
                self.claim(ptr, C.USED, "QC")
            assert di.size == len(data_blocks) * self.bsize
            return
        content = self.file_bytes(raw, di, data_blocks, path)
        res.files[path] = content
        if name.startswith("statfs"):
            assert len(content) == StatfsChange.SIZE
            assert StatfsChange.unpack(content).pack() == content
        elif name.startswith("inum_range"):
            assert InumRange.unpack(content).pack() == content
        elif name == "inum":
            assert pack_next_inum(unpack_next_inum(content)) == content
        elif name == "quota":
            assert len(content) % QuotaEntry.SIZE == 0
            for off in range(0, len(content), QuotaEntry.SIZE):
                chunk = content[off : off + QuotaEntry.SIZE]
                assert_same(chunk, QuotaEntry.unpack(chunk).pack(), f"{path}@{off}")
        res.counts["file"] += 1

    def visit_journal(self, di: Dinode, data_blocks: list[int], path: str) -> None:
        """Every block of a fresh journal is a log header; exactly one sequence wrap."""
        heads = []
        for position, ptr in enumerate(data_blocks):
            assert ptr, f"{path}: hole at journal block {position}"
            block = self.block(ptr)
            assert LogHeader.verify(block), f"{path}: header {position} fails verify"
            header = LogHeader.unpack(block)
            assert_same(block, header.pack_block(self.bsize), f"{path}: LH {position}")
            assert header.blkno == position and header.addr == ptr
            assert header.jinode == di.addr
            assert header.is_clean
            self.claim(ptr, C.USED, "LH")
            heads.append(header)
        assert di.size == len(data_blocks) * self.bsize
        drops = sum(
            1
            for prev, cur in zip(heads, heads[1:] + heads[:1], strict=True)
            if cur.sequence != prev.sequence + 1
        )
        assert drops == 1, f"{path}: sequences wrap {drops} times"
        self.result.journal_heads[path] = max(heads, key=lambda h: h.sequence)
        self.result.journal_blocks[path] = list(data_blocks)

    # -- directories -----------------------------------------------------------------

    def visit_directory(
        self, raw: bytes, di: Dinode, data_blocks: list[int], path: str, parent: Inum
    ) -> int:
        """Check a directory's dirents and recurse; returns leaf/JD blocks owned."""
        areas: list[tuple[bytes, int]] = []
        owned = 0
        if di.is_exhash():
            if di.height == 0:
                table_bytes = bytes(Dinode.payload(raw))[: di.size]
            else:
                parts = []
                for ptr in data_blocks:
                    block = self.block(ptr)
                    payload = bytes(jd_payload(block))
                    assert_same(block, pack_jd_block(self.bsize, payload), f"{path}: JD {ptr}")
                    self.claim(ptr, C.USED, "JD")
                    parts.append(payload)
                table_bytes = b"".join(parts)[: di.size]
            assert di.size == 8 << di.depth
            table = unpack_hash_table(table_bytes, di.depth)
            assert pack_hash_table(table) == table_bytes
            for leaf_addr in dict.fromkeys(table):
                next_addr = leaf_addr
                while next_addr:
                    block = self.block(next_addr)
                    leaf = Leaf.unpack(block)
                    assert_same(block[: Leaf.SIZE], leaf.pack(), f"{path}: leaf {next_addr}")
                    self.claim(next_addr, C.USED, "LF")
                    owned += 1
                    areas.append((block, Leaf.SIZE))
                    next_addr = leaf.next
        else:
            assert di.size == self.g.stuffed_size
            areas.append((raw, Dinode.SIZE))
        live = 0
        for block, start in areas:
            dirents = [d for _, d in iter_dirents(block, start, self.bsize)]
            for offset, dirent in iter_dirents(block, start, self.bsize):
                span = Dirent.HEADER_SIZE + dirent.name_len
                assert_same(
                    block[offset : offset + span], dirent.pack(), f"{path}: dirent", DIRENT_GARBAGE
                )
                if dirent.is_sentinel():
                    continue
                live += 1
                self.check_dirent(dirent, di, path, parent)
            if self.strict_layout and not di.is_exhash():
                relaid = pack_dirents([replace(d) for d in dirents], self.bsize - start)
                assert_same(block[start:], bytes(relaid), f"{path}: dirent layout", ())
            self.result.counts["dirent block"] += 1
        assert live == di.entries, f"{path}: {live} entries, di_entries {di.entries}"
        return owned

    def check_dirent(self, dirent: Dirent, di: Dinode, path: str, parent: Inum) -> None:
        assert dirent.hash == name_hash(dirent.name), f"{path}: bad hash for {dirent.name!r}"
        self.result.counts["dirent"] += 1
        if dirent.name == b".":
            assert dirent.inum == di.inum, f"{path}: '.' does not point to itself"
            return
        if dirent.name == b"..":
            assert dirent.inum == parent, f"{path}: '..' does not point to the parent"
            return
        child_path = f"{path}/{dirent.name.decode()}"
        self.visit_dinode(dirent.inum, child_path, parent=di.inum)
        child = self.result.dinodes[dirent.inum.addr]
        assert dirent.type == C.dt_from_mode(child.mode), f"{child_path}: de_type mismatch"

    # -- extended attributes -----------------------------------------------------------

    def visit_eattr(self, di: Dinode, path: str) -> int:
        owned = 0
        ea_blocks = [di.eattr]
        if di.has_ea_indirect():
            block = self.block(di.eattr)
            ptrs = unpack_indirect_block(block)
            assert_same(block, pack_indirect_block(self.bsize, ptrs), f"{path}: EA indirect")
            self.claim(di.eattr, C.USED, "EA indirect")
            owned += 1
            ea_blocks = [p for p in ptrs if p]
        for addr in ea_blocks:
            block = self.block(addr)
            records = [r for _, r in iter_ea_records(block)]
            assert_same(block, pack_ea_block(self.bsize, records), f"{path}: EA {addr}")
            self.claim(addr, C.USED, "EA")
            owned += 1
            for record in records:
                if record.is_stuffed:
                    continue
                value = b""
                for ptr in record.pointers:
                    ed = self.block(ptr)
                    chunk = bytes(ed_payload(ed))
                    assert_same(ed, pack_ed_block(self.bsize, chunk), f"{path}: ED {ptr}")
                    self.claim(ptr, C.USED, "ED")
                    owned += 1
                    value += chunk
                self.result.files[f"{path}@xattr:{record.name.decode()}"] = value[: record.data_len]
        return owned

    # -- resource groups -------------------------------------------------------------

    def check_rgrps(self, rindex: bytes) -> None:
        res = self.result
        entries = unpack_rindex(rindex)
        for index, entry in enumerate(entries):
            chunk = rindex[index * RindexEntry.SIZE : (index + 1) * RindexEntry.SIZE]
            assert_same(chunk, entry.pack(), f"rindex entry {index}", RINDEX_GARBAGE)
            assert entry.data0 == entry.addr + entry.length
            assert entry.bitbytes == entry.data // 4
            blocks = [self.block(entry.addr + i) for i in range(entry.length)]
            header = RgrpHeader.unpack(blocks[0])
            assert header.crc_ok and header.crc != 0, f"rgrp {entry.addr}: bad rg_crc"
            assert header.matches(entry)
            for rb in blocks[1:]:
                RgrpBitmapHeader.unpack(rb)
            bitmap = extract_bitmap(blocks, self.bsize, entry.bitbytes)
            repacked = pack_rgrp_blocks(header, bitmap, self.bsize, entry.length)
            for i, (raw, ours) in enumerate(zip(blocks, repacked, strict=True)):
                assert_same(raw, ours, f"rgrp {entry.addr} block {i}")
            free, used, unlinked, dinode = count_states(bitmap, entry.data)
            assert (free, dinode, unlinked) == (header.free, header.dinodes, 0)
            assert free + used + unlinked + dinode == entry.data
            res.rgrps.append(RgrpInfo(entry, header, bitmap))
            res.counts["RG"] += 1
            res.counts["RB"] += entry.length - 1
            res.counts["rindex entry"] += 1
        for prev, cur in zip(res.rgrps, res.rgrps[1:], strict=False):
            assert prev.header.skip == cur.entry.addr - prev.entry.addr
        assert res.rgrps[-1].header.skip == 0

    def check_bitmaps_match_claims(self) -> None:
        """Blocks the walk reached must be exactly the blocks the bitmaps allocate."""
        res = self.result
        unowned = dict(res.claimed)
        for info in res.rgrps:
            expected = bytearray(len(info.bitmap))
            for block in range(info.entry.data0, info.entry.end):
                state = unowned.pop(block, None)
                if state is not None:
                    set_state(expected, block - info.entry.data0, state)
            assert expected == info.bitmap, f"rgrp {info.entry.addr}: bitmap != walked blocks"
        assert not unowned, f"walked blocks outside every rgrp: {sorted(unowned)[:10]}"


def walk_image(path: Path, strict_layout: bool = True) -> WalkResult:
    walker = ImageWalker(path, strict_layout)
    try:
        return walker.walk()
    finally:
        walker.close()
