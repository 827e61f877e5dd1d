"""Each journal's log: damaged headers, duplicate or disordered sequences, and whether
it is clean.

A dirty journal counts as a problem here (exit 4), unlike fsck.gfs2 -n which notes it
and carries on: the metadata this check just read may be stale until the journal is
replayed, so "clean" would be a promise the check cannot keep.
"""

from __future__ import annotations

import logging

from gfspy.fsck.context import Fsck, Inode
from gfspy.fsck.trees import read_data
from gfspy.journal.scan import JournalScan, scan_journal
from gfspy.ondisk.constants import DINODE_SIZE, STATFS_CHANGE_SIZE
from gfspy.ondisk.statfs import StatfsChange

log = logging.getLogger(__name__)

#: Damaged headers listed per journal before the rest are only counted.
BAD_HEADERS_SHOWN = 5


def _device_block(runs: list[tuple[int, int]], position: int) -> int:
    """Device block of journal block `position`, through the journal's extents."""
    for start, count in runs:
        if position < count:
            return start + position
        position -= count
    return -1


async def check_journals(fsck: Fsck, journals: list[tuple[int, Inode]]) -> None:
    for j, ino in journals:
        name = f"journal{j}"
        scan = await scan_journal(fsck.reader.device, ino.data_runs, fsck.geo.bsize)
        _judge(fsck, name, ino, scan)
        if scan.clean:
            await _check_statfs_change(fsck, j)


async def _check_statfs_change(fsck: Fsck, j: int) -> None:
    """A cleanly unmounted node has folded its statfs deltas into the master file and
    zeroed them; leftovers would be added to the totals again at the next mount."""
    addr = fsck.system.get(f"statfs_change{j}")
    ino = fsck.inodes.get(addr) if addr is not None else None
    if ino is None or ino.dinode.size != STATFS_CHANGE_SIZE:
        return  # missing or mis-sized: the system-file check reported it
    if ino.dinode.height == 0:
        raw = ino.block[DINODE_SIZE : DINODE_SIZE + STATFS_CHANGE_SIZE]
    else:
        raw = await read_data(fsck, ino.data_runs, STATFS_CHANGE_SIZE)
    if len(raw) < STATFS_CHANGE_SIZE:
        return
    delta = StatfsChange.unpack(raw)
    if delta != StatfsChange():
        fsck.report.problem(
            "statfs",
            ino.label,
            f"holds unapplied deltas (total {delta.total}, free {delta.free}, dinodes "
            f"{delta.dinodes}) although journal{j} is clean",
        )


def _judge(fsck: Fsck, name: str, ino: Inode, scan: JournalScan) -> None:
    report = fsck.report
    runs = ino.data_runs
    where = f"{name} (inode {ino.addr})"
    for bad in scan.bad_headers[:BAD_HEADERS_SHOWN]:
        report.problem(
            "journal",
            f"{name} block {_device_block(runs, bad.position)}",
            f"log header at journal block {bad.position}: {bad.reason}",
        )
    if len(scan.bad_headers) > BAD_HEADERS_SHOWN:
        report.problem(
            "journal",
            where,
            f"{len(scan.bad_headers) - BAD_HEADERS_SHOWN} more damaged log headers",
        )
    for seq, positions in sorted(scan.duplicate_sequences.items())[:BAD_HEADERS_SHOWN]:
        report.problem(
            "journal",
            where,
            f"sequence {seq} appears in {len(positions)} log headers (journal blocks "
            f"{', '.join(map(str, positions[:4]))})",
        )
    if scan.out_of_order:
        report.problem(
            "journal",
            where,
            f"log header sequences go backwards at {scan.descents} places (a ring has one)",
        )
    head = scan.head
    if head is None:
        report.problem("journal", where, "no valid log header; the head cannot be found")
        return
    dev = _device_block(runs, head.position)
    if head.tail >= scan.blocks:
        report.problem(
            "journal",
            f"{name} block {dev}",
            f"head's lh_tail {head.tail} is outside the {scan.blocks}-block journal",
        )
    if not head.clean:
        report.problem(
            "dirty journal",
            name,
            f"dirty (head at block {dev}, seq {head.sequence}); replay needed",
        )
    else:
        report.note(f"{name}: clean (head at block {dev}, seq {head.sequence})")
