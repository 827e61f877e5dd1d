"""Read-only facts about a filesystem's journals, for the admin tool and for logs.

Reads only, so it is safe on a mounted filesystem (what it reports for a journal in
use is a snapshot that may already be stale).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from gfspy.blockdev.device import Device
from gfspy.journal.extent import map_journal, read_log_blocks
from gfspy.journal.locate import locate_journal
from gfspy.journal.scan import scan_journal
from gfspy.ondisk.journal import LogHeader

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class JournalStatus:
    """One journal as its newest header describes it."""

    jid: int
    dinode: int
    blocks: int
    runs: int
    clean: bool
    head: int | None
    sequence: int | None
    tail: int | None
    #: Journal blocks between tail and head that a replay would read (0 when clean).
    live_blocks: int
    #: Statfs deltas (total, free, dinodes) not yet folded into the master statfs.
    statfs_local: tuple[int, int, int]
    #: Problems found while scanning (bad or repeated headers), empty when healthy.
    problems: tuple[str, ...]

    def summary(self) -> str:
        """One greppable line, e.g. for `gfspy journals`."""
        state = "clean" if self.clean else "DIRTY"
        text = (
            f"journal{self.jid}: {state}, {self.blocks} blocks in {self.runs} run(s), "
            f"head {self.head} seq {self.sequence} tail {self.tail}, "
            f"{self.live_blocks} live blocks, statfs delta {self.statfs_local}"
        )
        if self.problems:
            text += "; " + "; ".join(self.problems)
        return text


async def journal_status(device: Device, jid: int) -> JournalStatus:
    """Describe journal `jid` of the filesystem on `device`."""
    files = await locate_journal(device, jid)
    extents = await map_journal(device, files.bsize, files.journal)
    scan = await scan_journal(device, list(extents.runs), files.bsize)
    problems = [f"bad header at block {b.position}: {b.reason}" for b in scan.bad_headers]
    problems += [
        f"sequence {seq} repeated at blocks {positions}"
        for seq, positions in sorted(scan.duplicate_sequences.items())
    ]
    if scan.out_of_order:
        problems.append(f"{scan.out_of_order} sequence(s) out of order")
    head = scan.head
    if head is None:
        problems.append("no valid log header")
        return JournalStatus(
            jid, files.journal, extents.blocks, len(extents.runs), False, None, None, None,
            0, (0, 0, 0), tuple(problems),
        )  # fmt: skip
    (block,) = await read_log_blocks(device, extents, head.position, 1)
    lh = LogHeader.unpack(block)
    live = 0 if head.clean else (head.position - head.tail) % extents.blocks
    return JournalStatus(
        jid=jid,
        dinode=files.journal,
        blocks=extents.blocks,
        runs=len(extents.runs),
        clean=head.clean,
        head=head.position,
        sequence=head.sequence,
        tail=head.tail,
        live_blocks=live,
        statfs_local=(lh.local_total, lh.local_free, lh.local_dinodes),
        problems=tuple(problems),
    )
