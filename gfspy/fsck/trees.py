"""Walking a dinode's metadata tree: IN blocks level by level, then the data pointers.

Each level is read as one batch (sorted, contiguous runs), so a journal's tree costs a
few reads instead of one per block. Bad pointers and mistyped IN blocks are reported
and not followed; everything reachable is claimed in the block map when asked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from gfspy.fsck.blockmap import USED
from gfspy.fsck.context import Fsck
from gfspy.ondisk.constants import DINODE_SIZE, META_HEADER_SIZE, METATYPE_IN
from gfspy.ondisk.indirect import unpack_pointers
from gfspy.ondisk.meta import peek_type, type_name

log = logging.getLogger(__name__)


@dataclass
class TreeWalk:
    """What a tree walk found: metadata and data block counts and the data runs."""

    meta_blocks: int = 0
    data_blocks: int = 0
    #: (first block, count) runs of data in logical order (holes skipped).
    data_runs: list[tuple[int, int]] = field(default_factory=list)


def add_to_runs(runs: list[tuple[int, int]], block: int) -> None:
    """Append `block` to the run list, extending the last run when contiguous."""
    if runs:
        start, count = runs[-1]
        if start + count == block:
            runs[-1] = (start, count + 1)
            return
    runs.append((block, 1))


def pointer_ok(fsck: Fsck, block: int) -> bool:
    """A pointer may name any block after the superblock inside the device."""
    return fsck.geo.sb_block < block < fsck.reader.device_blocks


async def walk_tree(
    fsck: Fsck,
    addr: int,
    dinode_block: bytes,
    height: int,
    label: str,
    *,
    claim: bool = True,
    report: bool = True,
) -> TreeWalk:
    """Walk the tree of the dinode at `addr`; claim IN and data blocks for it."""
    geo = fsck.geo
    walk = TreeWalk()
    if height == 0 or height > geo.max_height:
        return walk  # an impossible height is reported by pass1, not walked
    ptrs = unpack_pointers(dinode_block, DINODE_SIZE, geo.diptrs)
    bmap = fsck.blockmap
    for level in range(1, height):
        wanted = []
        for p in ptrs:
            if p == 0:
                continue
            if pointer_ok(fsck, p):
                wanted.append(p)
            elif report:
                fsck.report.problem(
                    "bad pointer",
                    label,
                    f"indirect pointer at height {level} to block {p} is out of range",
                )
        blocks = await fsck.reader.blocks(wanted)
        next_ptrs: list[int] = []
        for p in wanted:
            data = blocks[p]
            walk.meta_blocks += 1
            if claim:
                bmap.claim(p, addr, USED)
            mh_type = peek_type(data)
            if mh_type != METATYPE_IN:
                if report:
                    found = "no metadata header" if mh_type is None else type_name(mh_type)
                    fsck.report.problem(
                        "bad block type",
                        label,
                        f"block {p} at height {level} should be an indirect (IN) block "
                        f"but has {found}",
                    )
                continue
            next_ptrs.extend(unpack_pointers(data, META_HEADER_SIZE, geo.inptrs))
        ptrs = next_ptrs
    runs = walk.data_runs
    for p in ptrs:
        if p == 0:
            continue
        if not pointer_ok(fsck, p):
            if report:
                fsck.report.problem(
                    "bad pointer", label, f"data pointer to block {p} is out of range"
                )
            continue
        walk.data_blocks += 1
        add_to_runs(runs, p)
    if claim:
        for start, count in runs:
            bmap.claim_run(start, count, addr, USED)
    return walk


async def read_data(fsck: Fsck, runs: list[tuple[int, int]], limit: int) -> bytes:
    """The first `limit` bytes of a file's data blocks (raw: no per-block headers)."""
    out = bytearray()
    bs = fsck.geo.bsize
    for start, count in runs:
        if len(out) >= limit:
            break
        need = min(count, -(-(limit - len(out)) // bs))
        out += await fsck.reader.read_run(start, need)
    return bytes(out[:limit])
