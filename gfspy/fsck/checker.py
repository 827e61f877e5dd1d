"""The order of the checks, from the superblock down to the journals.

Each step relies on the ones before it: the rgrps locate the dinodes, pass 1 claims
blocks and gathers directory entries, passes 2-4 judge names and links, pass 5 holds the
claims against the bitmaps, then the statfs totals, the system files and the journals.
"""

from __future__ import annotations

import logging
import time

from gfspy.blockdev import Device
from gfspy.fsck.bitmaps import pass1b, pass5
from gfspy.fsck.context import Fsck
from gfspy.fsck.directories import pass2, pass3
from gfspy.fsck.errors import CheckAborted
from gfspy.fsck.inodes import pass1
from gfspy.fsck.journals import check_journals
from gfspy.fsck.links import pass4
from gfspy.fsck.report import Report
from gfspy.fsck.statfs import check_statfs
from gfspy.fsck.superblock_rgrps import load_rgrps, load_superblock
from gfspy.fsck.system import check_quota_change_blocks, check_system, name_system_inodes

log = logging.getLogger(__name__)


async def check_device(device: Device, report: Report) -> Fsck | None:
    """Run every check on an open device; problems go to `report`.

    Raises OperationalError when the device cannot be checked at all. Returns None
    when a fundamental structure was unusable and checking stopped early.
    """
    started = time.monotonic()
    fsck = await load_superblock(device, report)
    try:
        await load_rgrps(fsck)
        await name_system_inodes(fsck)
        _step(report, "pass1: inodes and their blocks", started)
        await pass1(fsck)
        _step(report, "pass1b: duplicate blocks", started)
        pass1b(fsck)
        _step(report, "pass2: directory entries", started)
        refs = pass2(fsck)
        _step(report, "pass3: directory connectivity", started)
        pass3(fsck)
        _step(report, "pass4: link counts", started)
        pass4(fsck, refs)
        _step(report, "pass5: bitmaps", started)
        pass5(fsck)
        _step(report, "system files and statfs", started)
        journals = check_system(fsck)
        await check_quota_change_blocks(fsck)
        await check_statfs(fsck)
        _step(report, "journals", started)
        await check_journals(fsck, journals)
    except CheckAborted:
        report.note("checking stopped early")
        return None
    _step(report, f"done, {fsck.reader.bytes_read >> 20} MiB read", started)
    return fsck


def _step(report: Report, what: str, started: float) -> None:
    report.note(f"[{time.monotonic() - started:7.2f}s] {what}")
