"""Extended-attribute blocks of one inode: the EA (or EA-indirect) block, its records
and their ED value blocks. All of them count in di_blocks and are claimed USED.
"""

from __future__ import annotations

import logging

from gfspy.fsck.blockmap import USED
from gfspy.fsck.context import Fsck, Inode
from gfspy.fsck.trees import pointer_ok
from gfspy.ondisk.constants import (
    EA_MAX_DATA_LEN,
    EATYPE_LAST,
    EATYPE_SECURITY,
    EATYPE_UNUSED,
    FORMAT_FS,
    META_HEADER_SIZE,
    METATYPE_EA,
    METATYPE_ED,
    METATYPE_IN,
)
from gfspy.ondisk.errors import FormatError
from gfspy.ondisk.indirect import unpack_pointers
from gfspy.ondisk.meta import peek_type, type_name
from gfspy.ondisk.xattr import ea_num_ptrs, iter_ea_records

log = logging.getLogger(__name__)


def _type_problem(fsck: Fsck, ino: Inode, block: int, want: str, data: bytes | None) -> None:
    t = peek_type(data) if data is not None else None
    found = "no metadata header" if t is None else type_name(t)
    fsck.report.problem(
        "bad block type", ino.label, f"block {block} should be {want} but has {found}"
    )


async def check_xattrs(fsck: Fsck, ino: Inode) -> int:
    """Walk the inode's xattr blocks; returns how many blocks they take."""
    di = ino.dinode
    if not di.eattr:
        return 0
    if not pointer_ok(fsck, di.eattr):
        fsck.report.problem("bad pointer", ino.label, f"di_eattr {di.eattr} is out of range")
        return 0
    count = 1
    fsck.blockmap.claim(di.eattr, ino.addr, USED)
    first = await fsck.reader.block(di.eattr)
    if di.has_ea_indirect():
        if peek_type(first) != METATYPE_IN:
            _type_problem(fsck, ino, di.eattr, "an EA indirect (IN) block", first)
            return count
        ea_blocks = []
        for p in unpack_pointers(first, META_HEADER_SIZE, fsck.geo.inptrs):
            if p == 0:
                break
            if not pointer_ok(fsck, p):
                fsck.report.problem(
                    "bad pointer", ino.label, f"EA indirect block {di.eattr} points to {p}"
                )
                continue
            ea_blocks.append(p)
    else:
        ea_blocks = [di.eattr]
        count = 0
    got = await fsck.reader.blocks(ea_blocks)
    for b in ea_blocks:
        if b != di.eattr:
            fsck.blockmap.claim(b, ino.addr, USED)
        count += 1
        count += await _check_ea_block(fsck, ino, b, got.get(b))
    return count


async def _check_ea_block(fsck: Fsck, ino: Inode, blockno: int, data: bytes | None) -> int:
    """Check one EA block's records; claim its ED blocks and return their number."""
    if data is None or peek_type(data) != METATYPE_EA:
        _type_problem(fsck, ino, blockno, "an EA block", data)
        return 0
    where = f"{ino.label} EA block {blockno}"
    max_type = EATYPE_LAST if fsck.sb.fs_format >= FORMAT_FS else EATYPE_SECURITY
    jbsize = fsck.geo.jbsize
    ed_blocks: list[int] = []
    try:
        for offset, rec in iter_ea_records(data, fsck.geo.bsize):
            if rec.type == EATYPE_UNUSED:
                continue
            if rec.name_len == 0:
                fsck.report.problem("xattr", where, f"record at offset {offset} has no name")
            if rec.type > max_type:
                fsck.report.problem(
                    "xattr", where, f"record at offset {offset} has type {rec.type}"
                )
            if rec.data_len > EA_MAX_DATA_LEN:
                fsck.report.problem(
                    "xattr", where, f"record at offset {offset} has a {rec.data_len}-byte value"
                )
            if rec.num_ptrs and rec.num_ptrs < ea_num_ptrs(jbsize, rec.data_len):
                fsck.report.problem(
                    "xattr",
                    where,
                    f"record at offset {offset}: {rec.num_ptrs} ED blocks cannot hold "
                    f"{rec.data_len} bytes",
                )
            for p in rec.pointers:
                if pointer_ok(fsck, p):
                    ed_blocks.append(p)
                else:
                    fsck.report.problem("bad pointer", where, f"ED pointer {p} is out of range")
    except FormatError as e:
        fsck.report.problem("xattr", where, f"bad record chain: {e}")
    got = await fsck.reader.blocks(ed_blocks)
    for p in ed_blocks:
        fsck.blockmap.claim(p, ino.addr, USED)
        if peek_type(got.get(p) or b"") != METATYPE_ED:
            _type_problem(fsck, ino, p, "an ED block", got.get(p))
    return len(ed_blocks)
