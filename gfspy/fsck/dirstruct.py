"""Directory structure, read during pass1: dirent chains, the exhash table and leaves.

Leaves and hash-table blocks belong to the directory, so they must be found (and
claimed) while its blocks are counted; the entries gathered here are judged against
their targets in pass2, once every dinode is known.
"""

from __future__ import annotations

import logging

from gfspy.fsck.blockmap import USED
from gfspy.fsck.context import DirEntry, Fsck, Inode
from gfspy.fsck.trees import TreeWalk, pointer_ok
from gfspy.ondisk.constants import (
    DINODE_SIZE,
    DIR_MAX_DEPTH,
    LEAF_HEADER_SIZE,
    META_HEADER_SIZE,
    METATYPE_JD,
    METATYPE_LF,
)
from gfspy.ondisk.directory import Leaf, hash_index, iter_dirents, unpack_hash_table
from gfspy.ondisk.errors import FormatError
from gfspy.ondisk.meta import peek_type, type_name

log = logging.getLogger(__name__)


def collect_area(
    fsck: Fsck, ino: Inode, data: bytes, start: int, where: str, depth_check: tuple | None
) -> int:
    """Gather the live dirents tiling data[start:bsize]; returns how many were live.

    `depth_check` is (leaf depth, first slot index, table depth) for leaf entries: every
    entry's hash must select one of the slots pointing at this leaf.
    """
    live = 0
    try:
        first = True
        for offset, d in iter_dirents(data, start, fsck.geo.bsize):
            if d.is_sentinel():
                if not first:
                    fsck.report.problem(
                        "dirent",
                        f"{ino.label} {where}".rstrip(),
                        f"unused entry at offset {offset} is not the first in its block",
                    )
                first = False
                continue
            first = False
            live += 1
            at = f"{where} offset {offset}" if where else f"offset {offset}"
            ino.entries.append(DirEntry(ino.addr, d.name, d, at))
            if depth_check is not None:
                lf_depth, slot, depth = depth_check
                if lf_depth <= depth and hash_index(d.hash, depth) >> (depth - lf_depth) != (
                    slot >> (depth - lf_depth)
                ):
                    fsck.report.problem(
                        "dirent",
                        f"{ino.label} {where}".rstrip(),
                        f"entry {d.name!r} (hash 0x{d.hash:08x}) does not belong in this leaf",
                    )
    except FormatError as e:
        fsck.report.problem("dirent", f"{ino.label} {where}".rstrip(), f"broken dirent chain: {e}")
    return live


async def collect_directory(fsck: Fsck, ino: Inode, walk: TreeWalk) -> int:
    """Read a directory's entries into `ino.entries`; returns the leaf blocks it owns."""
    di = ino.dinode
    if not di.is_exhash():
        if di.height != 0:
            fsck.report.problem("directory", ino.label, f"linear directory has height {di.height}")
        collect_area(fsck, ino, ino.block, DINODE_SIZE, "", None)
        return 0
    depth = di.depth
    if depth > DIR_MAX_DEPTH:
        fsck.report.problem(
            "directory", ino.label, f"hash table depth {depth} exceeds {DIR_MAX_DEPTH}"
        )
        return 0
    if di.size != 8 << depth:
        fsck.report.problem(
            "directory",
            ino.label,
            f"size {di.size} does not match a hash table of depth {depth} ({8 << depth} bytes)",
        )
    if depth < fsck.geo.min_exhash_depth:
        fsck.report.problem(
            "directory",
            ino.label,
            f"hash table depth {depth} is below {fsck.geo.min_exhash_depth} (kernels refuse it)",
        )
    table_bytes = await _hash_table_bytes(fsck, ino, walk, 8 << depth)
    if table_bytes is None:
        return 0
    table = unpack_hash_table(table_bytes, depth)
    return await _check_leaves(fsck, ino, table, depth)


async def _hash_table_bytes(fsck: Fsck, ino: Inode, walk: TreeWalk, size: int) -> bytes | None:
    di = ino.dinode
    if di.height == 0:
        if size > fsck.geo.stuffed_size:
            fsck.report.problem(
                "directory", ino.label, "stuffed hash table does not fit the dinode"
            )
            return None
        return bytes(ino.block[DINODE_SIZE : DINODE_SIZE + size])
    blocks = [b for s, n in walk.data_runs for b in range(s, s + n)]
    got = await fsck.reader.blocks(blocks)
    parts = []
    for b in blocks:
        data = got.get(b)
        t = peek_type(data) if data is not None else None
        if t != METATYPE_JD:
            found = "no metadata header" if t is None else type_name(t)
            fsck.report.problem(
                "bad block type", ino.label, f"hash table block {b} should be JD but has {found}"
            )
            return None
        parts.append(data[META_HEADER_SIZE:])
    table = b"".join(parts)
    if len(table) < size:
        fsck.report.problem(
            "directory", ino.label, f"hash table holds {len(table)} of its {size} bytes"
        )
        return None
    return table[:size]


async def _check_leaves(fsck: Fsck, ino: Inode, table: list[int], depth: int) -> int:
    """Check pointer runs against leaf depths, walk chains, gather entries."""
    report = fsck.report
    first_slot: dict[int, int] = {}
    runs: list[tuple[int, int, int]] = []  # (leaf, first slot, run length)
    i = 0
    n = len(table)
    while i < n:
        j = i
        while j < n and table[j] == table[i]:
            j += 1
        runs.append((table[i], i, j - i))
        i = j
    leaves_wanted = {p for p, _, _ in runs if pointer_ok(fsck, p)}
    for p, _, _ in runs:
        if not pointer_ok(fsck, p):
            report.problem(
                "bad pointer", ino.label, f"hash table points to block {p}, out of range"
            )
    blocks = await fsck.reader.blocks(leaves_wanted)
    owned: set[int] = set()
    for p, slot, length in runs:
        if p not in blocks:
            continue
        if p in first_slot:
            report.problem(
                "directory",
                ino.label,
                f"leaf {p} is referenced by two separate runs of hash table slots "
                f"({first_slot[p]} and {slot})",
            )
            continue
        first_slot[p] = slot
        data = blocks[p]
        try:
            leaf = Leaf.unpack(data)
        except FormatError as e:
            report.problem("bad block type", f"{ino.label} leaf {p}", f"not a leaf: {e}")
            continue
        if (
            length & (length - 1)
            or slot % length
            or leaf.depth > depth
            or (length != 1 << (depth - leaf.depth))
        ):
            report.problem(
                "directory",
                f"{ino.label} leaf {p}",
                f"lf_depth {leaf.depth} does not match its {length} hash table slot(s) "
                f"from index {slot} (table depth {depth})",
            )
        await _walk_chain(fsck, ino, p, leaf, data, slot, depth, owned)
    return len(owned)


async def _walk_chain(
    fsck: Fsck,
    ino: Inode,
    first: int,
    leaf: Leaf,
    data: bytes,
    slot: int,
    depth: int,
    owned: set[int],
) -> None:
    report = fsck.report
    blockno = first
    chain_depth = leaf.depth
    while True:
        if blockno in owned:
            report.problem(
                "directory", f"{ino.label} leaf {blockno}", "leaf chain loops or is shared"
            )
            return
        owned.add(blockno)
        fsck.blockmap.claim(blockno, ino.addr, USED)
        where = f"leaf {blockno}"
        live = collect_area(fsck, ino, data, LEAF_HEADER_SIZE, where, (chain_depth, slot, depth))
        if live != leaf.entries:
            report.problem(
                "directory",
                f"{ino.label} leaf {blockno}",
                f"lf_entries is {leaf.entries} but the leaf has {live} entries",
            )
        if not leaf.next:
            return
        nxt = leaf.next
        if not pointer_ok(fsck, nxt):
            report.problem(
                "bad pointer", f"{ino.label} leaf {blockno}", f"lf_next {nxt} is out of range"
            )
            return
        data = await fsck.reader.block(nxt)
        if peek_type(data) != METATYPE_LF:
            report.problem(
                "bad block type",
                f"{ino.label} leaf {blockno}",
                f"lf_next {nxt} is not a leaf block",
            )
            return
        leaf = Leaf.unpack(data)
        if leaf.depth != chain_depth:
            report.problem(
                "directory",
                f"{ino.label} leaf {nxt}",
                f"chained leaf has lf_depth {leaf.depth}, its chain's first leaf has {chain_depth}",
            )
        blockno = nxt
