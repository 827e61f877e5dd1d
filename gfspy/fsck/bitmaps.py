"""Pass 5 (and 1b): what the inodes own against what the bitmaps say.

Blocks owned twice, blocks owned outside every rgrp's data area, and then, rgrp by
rgrp, the bitmap compared with one built from the claims. Equal rgrps (nearly all of
them) cost one bytes comparison; only differing ones are examined block by block.
"""

from __future__ import annotations

import bisect
import logging

from gfspy.fsck.blockmap import Claim, expected_bitmap
from gfspy.fsck.context import Fsck, Rgrp

log = logging.getLogger(__name__)

STATE_NAMES = {0: "free", 1: "data", 2: "unlinked", 3: "dinode"}
#: Differing blocks listed per rgrp before the rest are only counted.
DIFFS_SHOWN_PER_RGRP = 10


def pass1b(fsck: Fsck) -> None:
    """Duplicates and claims outside the data areas (call once pass 1 is done)."""
    bmap = fsck.blockmap
    bmap.sort()
    for start, count, a, b in bmap.overlaps():
        span = f"block {start}" if count == 1 else f"blocks {start}-{start + count - 1}"
        a, b = sorted((a, b))
        owners = f"inode {a}" if a == b else f"inodes {a} and {b}"
        fsck.report.problem("duplicate", span, f"claimed twice, by {owners}")
    starts = [r.entry.data0 for r in fsck.rgrps]
    for c in bmap.claims:
        i = bisect.bisect_right(starts, c.start) - 1
        if i < 0 or c.end > fsck.rgrps[i].entry.end:
            span = f"block {c.start}" if c.count == 1 else f"blocks {c.start}-{c.end - 1}"
            fsck.report.problem(
                "outside rgrps",
                span,
                f"owned by {fsck.label(c.owner)} but not in any resource group's data area",
            )


def pass5(fsck: Fsck) -> None:
    """Compare every readable rgrp's bitmap with the block map."""
    for rg in fsck.rgrps:
        if rg.header is None:
            continue
        claims = fsck.blockmap.in_range(rg.entry.data0, rg.entry.end)
        want = expected_bitmap(claims, rg.entry.data0, rg.entry.data)
        if bytes(want) != rg.bitmap:
            _report_diffs(fsck, rg, bytes(want), claims)


def _owner(claims: list[Claim], block: int) -> int | None:
    for c in claims:
        if c.start <= block < c.end:
            return c.owner
    return None


def _report_diffs(fsck: Fsck, rg: Rgrp, want: bytes, claims: list[Claim]) -> None:
    ndata = rg.entry.data
    have_v = int.from_bytes(rg.bitmap, "little")
    want_v = int.from_bytes(want, "little")
    diff = have_v ^ want_v
    evens = int.from_bytes(b"\x55" * len(want), "little")
    mask = (diff | (diff >> 1)) & evens
    total = mask.bit_count()
    shown = 0
    while mask and shown < DIFFS_SHOWN_PER_RGRP:
        bit = mask & -mask
        mask ^= bit
        n = (bit.bit_length() - 1) // 2
        if n >= ndata:
            break
        have = (have_v >> (2 * n)) & 3
        expect = (want_v >> (2 * n)) & 3
        block = rg.entry.data0 + n
        owner = _owner(claims, block)
        seen = (
            f"{STATE_NAMES[expect]} (owned by {fsck.label(owner)})"
            if owner is not None
            else "free (no inode owns it)"
        )
        fsck.report.problem(
            "bitmap",
            f"block {block}",
            f"bitmap says {STATE_NAMES[have]} but the check found it {seen}",
        )
        shown += 1
    if total > shown:
        fsck.report.problem(
            "bitmap",
            f"rgrp {rg.entry.addr}",
            f"{total - shown} more block(s) disagree with the bitmap",
        )
