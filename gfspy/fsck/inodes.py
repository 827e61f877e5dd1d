"""Pass 1: every dinode the bitmaps mark (plus master and root), its fields, its
metadata tree, its xattrs and, for directories, its hash table and leaves.

Everything an inode owns is claimed in the block map, which later passes compare with
the bitmaps (pass 5) and search for blocks owned twice.
"""

from __future__ import annotations

import logging
import stat

from gfspy.fsck.blockmap import DINODE
from gfspy.fsck.context import Fsck, Inode
from gfspy.fsck.dirstruct import collect_directory
from gfspy.fsck.reader import contiguous_runs
from gfspy.fsck.trees import walk_tree
from gfspy.fsck.xattrs import check_xattrs
from gfspy.ondisk.constants import (
    DIF_JDATA,
    DIF_SYSTEM,
    DIF_TRUNC_IN_PROG,
    METATYPE_DI,
)
from gfspy.ondisk.dinode import Dinode
from gfspy.ondisk.errors import FormatError
from gfspy.ondisk.meta import peek_type, type_name

log = logging.getLogger(__name__)

_NSEC_LIMIT = 1_000_000_000


def _state_positions(bitmap: bytes, ndata: int, want: int) -> list[int]:
    """Data-block indexes whose two-bit state is `want`, without a per-block loop
    over blocks that do not match."""
    if not bitmap:
        return []
    value = int.from_bytes(bitmap[: (ndata + 3) // 4], "little") & ((1 << (2 * ndata)) - 1)
    evens = int.from_bytes(b"\x55" * ((ndata + 3) // 4), "little")
    low = value & evens
    high = (value >> 1) & evens
    mask = low & high if want == DINODE else high & ~low  # else UNLINKED
    out = []
    while mask:
        bit = mask & -mask
        out.append((bit.bit_length() - 1) // 2)
        mask ^= bit
    return out


def dinode_candidates(fsck: Fsck) -> list[int]:
    """Blocks the bitmaps mark DINODE or UNLINKED, plus every system inode (whatever
    its bitmap says, so a system dinode wrongly marked free is still checked)."""
    found = {fsck.sb.master_dir.addr, fsck.sb.root_dir.addr}
    found.update(a for a in fsck.system.values() if fsck.rgrp_of(a) is not None)
    for rg in fsck.rgrps:
        for state in (DINODE, 2):
            for n in _state_positions(rg.bitmap, rg.entry.data, state):
                found.add(rg.entry.data0 + n)
    return sorted(found)


async def pass1(fsck: Fsck) -> None:
    """Decode and check every candidate dinode; record what it owns."""
    candidates = dinode_candidates(fsck)
    fsck.report.note(f"pass1: {len(candidates)} dinodes to check")
    names = {addr: name for name, addr in fsck.system.items()}
    for start, count in contiguous_runs(candidates, 256):
        raw = await fsck.reader.read_run(start, count)
        bs = fsck.geo.bsize
        for k in range(count):
            addr = start + k
            block = raw[k * bs : (k + 1) * bs]
            ino = _decode(fsck, addr, block, names.get(addr))
            if ino is not None:
                fsck.inodes[addr] = ino
                try:
                    await check_inode(fsck, ino)
                except FormatError as e:  # a structure the checks above did not foresee
                    fsck.report.problem("undecodable", ino.label, f"cannot decode: {e}")


def _decode(fsck: Fsck, addr: int, block: bytes, name: str | None) -> Inode | None:
    label = f"inode {addr}" + (f" ({name})" if name else "")
    t = peek_type(block)
    if t != METATYPE_DI:
        found = "no metadata header" if t is None else f"a {type_name(t)} block"
        fsck.report.problem("not a dinode", label, f"is not a dinode: the block holds {found}")
        fsck.bad_dinodes.add(addr)
        return None
    try:
        di = Dinode.unpack(block)
    except FormatError as e:
        fsck.report.problem("not a dinode", label, f"undecodable dinode: {e}")
        fsck.bad_dinodes.add(addr)
        return None
    if di.addr != addr:
        fsck.report.problem("dinode", label, f"no_addr is {di.addr}, expected {addr}")
        fsck.bad_dinodes.add(addr)
        return None
    return Inode(addr, di, block, label=label)


async def check_inode(fsck: Fsck, ino: Inode) -> None:
    """Field checks, tree walk, xattrs, directory structure and di_blocks."""
    di = ino.dinode
    report = fsck.report
    geo = fsck.geo
    fsck.blockmap.claim(ino.addr, ino.addr, DINODE)
    if not di.has_valid_type():
        report.problem("dinode", ino.label, f"mode 0{di.mode:o} is not a valid file type")
    if di.flags & DIF_TRUNC_IN_PROG:
        report.problem("dinode", ino.label, "truncate-in-progress flag is set")
    if di.height > geo.max_height:
        report.problem("dinode", ino.label, f"height {di.height} exceeds {geo.max_height}")
        return
    try:
        need = geo.height_for_size(di.size, is_dir=di.is_dir())
    except ValueError:
        need = geo.max_height + 1
    # A file grown by truncate keeps its tree (GFS2 only sets the size; what lies
    # past the tree reads as a hole), so only a stuffed file and a directory's hash
    # table, which is real data, must fit their height.
    if di.height < need and (di.height == 0 or di.is_dir()):
        report.problem("dinode", ino.label, f"height {di.height} cannot hold size {di.size}")
    for what, nsec in (
        ("atime", di.atime_nsec),
        ("mtime", di.mtime_nsec),
        ("ctime", di.ctime_nsec),
    ):
        if nsec >= _NSEC_LIMIT:
            report.problem("dinode", ino.label, f"{what} nanoseconds {nsec} out of range")
    if not di.flags & DIF_SYSTEM and not (geo.sb_block < di.goal_meta <= fsck.fs_blocks):
        report.problem("dinode", ino.label, f"bad allocation goal block {di.goal_meta}")
    _check_type_rules(fsck, ino)
    keep = di.is_dir() or di.is_system()
    walk = await walk_tree(fsck, ino.addr, ino.block, di.height, ino.label)
    if keep:
        ino.data_runs = walk.data_runs
    ino.data_blocks = walk.data_blocks
    leaves = 0
    if di.is_dir():
        leaves = await collect_directory(fsck, ino, walk)
    ea = await check_xattrs(fsck, ino)
    counted = 1 + walk.meta_blocks + walk.data_blocks + leaves + ea
    if counted != di.blocks:
        report.problem(
            "di_blocks",
            ino.label,
            f"di_blocks is {di.blocks} but the inode owns {counted} blocks",
        )


def _check_type_rules(fsck: Fsck, ino: Inode) -> None:
    di = ino.dinode
    report = fsck.report
    stuffed = fsck.geo.stuffed_size
    if di.height == 0 and di.size > stuffed and not (di.is_dir() and di.is_exhash()):
        report.problem("dinode", ino.label, f"stuffed inode has size {di.size} > {stuffed}")
    if di.is_dir():
        if not di.flags & DIF_JDATA:
            report.problem("dinode", ino.label, "directory lacks the JDATA flag")
        if not di.is_exhash() and di.size != stuffed:
            report.problem(
                "dinode", ino.label, f"linear directory has size {di.size}, expected {stuffed}"
            )
    elif di.is_exhash():
        report.problem("dinode", ino.label, "EXHASH flag on a non-directory")
    if di.is_lnk() and not 1 <= di.size < stuffed:
        report.problem("dinode", ino.label, f"symlink target length {di.size} is out of range")
    if stat.S_IFMT(di.mode) in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK) and (
        di.size or di.height
    ):
        report.problem("dinode", ino.label, f"special file has size {di.size}")
