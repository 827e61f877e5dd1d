"""The master statfs file against the resource groups.

fsck.gfs2 compares only the master file; the per-node statfs_change files are judged
with their journals (see journals.py), since only a clean journal implies they are zero.
"""

from __future__ import annotations

import logging

from gfspy.fsck.context import Fsck
from gfspy.fsck.trees import read_data
from gfspy.ondisk.constants import DINODE_SIZE, STATFS_CHANGE_SIZE
from gfspy.ondisk.statfs import StatfsChange

log = logging.getLogger(__name__)


async def check_statfs(fsck: Fsck) -> None:
    """Master statfs totals against the sums over the rgrps' bitmaps."""
    addr = fsck.system.get("statfs")
    ino = fsck.inodes.get(addr) if addr is not None else None
    if ino is None or ino.dinode.size < STATFS_CHANGE_SIZE:
        return
    if ino.dinode.height == 0:
        raw = ino.block[DINODE_SIZE : DINODE_SIZE + STATFS_CHANGE_SIZE]
    else:
        raw = await read_data(fsck, ino.data_runs, STATFS_CHANGE_SIZE)
    if len(raw) < STATFS_CHANGE_SIZE:
        fsck.report.problem(
            "statfs", ino.label, f"holds {len(raw)} of its {STATFS_CHANGE_SIZE} bytes"
        )
        return
    have = StatfsChange.unpack(raw)
    total = free = dinodes = 0
    for rg in fsck.rgrps:
        total += rg.entry.data
        if rg.header is None:
            return  # counts unknown; the rgrp fault is already reported
        f, _, _, d = rg.counts
        free += f
        dinodes += d
    for what, on_disk, real in (
        ("total", have.total, total),
        ("free", have.free, free),
        ("dinodes", have.dinodes, dinodes),
    ):
        if on_disk != real:
            fsck.report.problem(
                "statfs",
                ino.label,
                f"statfs {what} is {on_disk} but the resource groups have {real}",
            )
