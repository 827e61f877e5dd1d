"""What the checker saw: every block some inode owns, as extents, and who owns it.

A 1 TiB filesystem has 2^28 blocks, so nothing here is per block: pointers are
coalesced into runs as they are recorded, duplicates are found by sorting runs, and
the expected bitmap of an rgrp is built from the runs that fall in it.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: Bitmap states (two bits per block), as in the on-disk format.
FREE, USED, UNLINKED, DINODE = 0, 1, 2, 3


@dataclass(slots=True)
class Claim:
    """`count` blocks from `start`, owned by inode `owner` (its no_addr), in `state`."""

    start: int
    count: int
    owner: int
    state: int

    @property
    def end(self) -> int:
        return self.start + self.count


class BlockMap:
    """Collects claims; coalesces consecutive blocks of one owner and state."""

    def __init__(self) -> None:
        self.claims: list[Claim] = []
        self._last: Claim | None = None

    def claim(self, block: int, owner: int, state: int = USED) -> None:
        last = self._last
        if last is not None and last.owner == owner and last.state == state and last.end == block:
            last.count += 1
            return
        self._last = Claim(block, 1, owner, state)
        self.claims.append(self._last)

    def claim_run(self, start: int, count: int, owner: int, state: int = USED) -> None:
        if count <= 0:
            return
        last = self._last
        if last is not None and last.owner == owner and last.state == state and last.end == start:
            last.count += count
            return
        self._last = Claim(start, count, owner, state)
        self.claims.append(self._last)

    def sort(self) -> None:
        self.claims.sort(key=lambda c: c.start)
        self._last = None

    def overlaps(self) -> list[tuple[int, int, int, int]]:
        """(first block, count, owner A, owner B) for every range claimed twice.

        Call after sort(). Each overlap is reported against the earlier claim that
        reaches furthest, which is enough to name both owners.
        """
        found: list[tuple[int, int, int, int]] = []
        reach: Claim | None = None
        for c in self.claims:
            if reach is not None and c.start < reach.end:
                n = min(c.end, reach.end) - c.start
                found.append((c.start, n, reach.owner, c.owner))
            if reach is None or c.end > reach.end:
                reach = c
        return found

    def in_range(self, first: int, end: int) -> list[Claim]:
        """Sorted claims that intersect [first, end); call after sort()."""
        starts = self._starts()
        i = bisect.bisect_left(starts, first)
        # A claim that starts before `first` may still reach into the range.
        while i > 0 and self.claims[i - 1].end > first:
            i -= 1
        out = []
        while i < len(self.claims) and self.claims[i].start < end:
            if self.claims[i].end > first:
                out.append(self.claims[i])
            i += 1
        return out

    def _starts(self) -> list[int]:
        cached = getattr(self, "_starts_cache", None)
        if cached is None or len(cached) != len(self.claims):
            cached = [c.start for c in self.claims]
            self._starts_cache = cached
        return cached


def expected_bitmap(claims: list[Claim], data0: int, data_blocks: int) -> bytearray:
    """The bitmap bytes an rgrp should hold given the claims that fall in it."""
    nbytes = (data_blocks + 3) // 4
    bitmap = bytearray(nbytes)
    fill = {USED: 0x55, DINODE: 0xFF, UNLINKED: 0xAA}
    for c in claims:
        lo = max(c.start, data0) - data0
        hi = min(c.end, data0 + data_blocks) - data0
        if lo >= hi:
            continue
        # Edges block by block, whole bytes in the middle with one slice assignment.
        first_full = (lo + 3) // 4
        last_full = hi // 4
        if first_full < last_full:
            for n in range(lo, first_full * 4):
                _set(bitmap, n, c.state)
            bitmap[first_full:last_full] = bytes([fill[c.state]]) * (last_full - first_full)
            for n in range(last_full * 4, hi):
                _set(bitmap, n, c.state)
        else:
            for n in range(lo, hi):
                _set(bitmap, n, c.state)
    return bitmap


def _set(bitmap: bytearray, n: int, state: int) -> None:
    shift = (n % 4) * 2
    i = n // 4
    bitmap[i] = (bitmap[i] & ~(3 << shift)) | (state << shift)
