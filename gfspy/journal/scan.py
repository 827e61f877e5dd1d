"""Finding a journal's head and telling whether the journal is clean.

The scan is a sans-IO machine: feed it journal blocks in logical order (any batch
size), then ask for the result. It keeps only the small header records, so a 1 GiB
journal is scanned in constant memory. `scan_journal` is the thin trio reader on top.

Rules (GFS2 log format): a block is a log header when it carries the magic and type LH;
a header counts only if its lh_hash matches and its lh_crc is zero or matches. The head
is the valid header with the highest sequence; the journal is clean iff the head has the
UNMOUNT flag. Sequences must be unique and rise around the ring with one wrap point.
Replay reuses `head` and the list of valid headers; nothing here is specific to fsck.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from gfspy.blockdev import Device
from gfspy.ondisk.checksums import lh_crc, lh_hash
from gfspy.ondisk.constants import GFS2_MAGIC, LH_UNMOUNT, METATYPE_LH
from gfspy.ondisk.errors import FormatError
from gfspy.ondisk.journal import LogHeader

log = logging.getLogger(__name__)

_LH_PREFIX = GFS2_MAGIC.to_bytes(4, "big") + METATYPE_LH.to_bytes(4, "big")


@dataclass(frozen=True, slots=True)
class HeaderRecord:
    """The parts of one valid log header that head finding and replay need."""

    position: int
    sequence: int
    flags: int
    tail: int
    blkno: int

    @property
    def clean(self) -> bool:
        return bool(self.flags & LH_UNMOUNT)


@dataclass(frozen=True, slots=True)
class BadHeader:
    """A block typed as a log header that fails a check; `reason` says which."""

    position: int
    reason: str


@dataclass
class JournalScan:
    """The outcome of scanning one journal."""

    blocks: int
    headers: list[HeaderRecord] = field(default_factory=list)
    bad_headers: list[BadHeader] = field(default_factory=list)
    #: sequence -> positions, for every sequence carried by more than one valid header.
    duplicate_sequences: dict[int, list[int]] = field(default_factory=dict)
    #: How many times the sequence drops going around the ring (1 is normal).
    descents: int = 0
    head: HeaderRecord | None = None

    @property
    def clean(self) -> bool:
        """True iff a head was found and it says the journal was unmounted cleanly."""
        return self.head is not None and self.head.clean

    @property
    def out_of_order(self) -> int:
        """Descents beyond the single wrap point a healthy ring has."""
        return max(0, self.descents - 1)


def check_header(block: bytes, position: int) -> HeaderRecord | BadHeader | None:
    """Classify one journal block: a valid header, a damaged one, or not a header."""
    if block[:8] != _LH_PREFIX:
        return None
    try:
        lh = LogHeader.unpack(block)
    except FormatError as e:
        return BadHeader(position, f"undecodable log header ({e})")
    want_hash = lh_hash(block)
    if lh.hash != want_hash:
        return BadHeader(position, f"bad lh_hash 0x{lh.hash:08x}, expected 0x{want_hash:08x}")
    if lh.crc != 0:
        want_crc = lh_crc(block)
        if lh.crc != want_crc:
            return BadHeader(position, f"bad lh_crc 0x{lh.crc:08x}, expected 0x{want_crc:08x}")
    if lh.blkno != position:
        return BadHeader(position, f"lh_blkno is {lh.blkno}, expected {position}")
    return HeaderRecord(position, lh.sequence, lh.flags, lh.tail, lh.blkno)


class JournalScanner:
    """Sans-IO scanner: `feed` blocks in logical order, then `finish`."""

    def __init__(self, journal_blocks: int, bsize: int) -> None:
        self.journal_blocks = journal_blocks
        self.bsize = bsize
        self._next = 0
        self._result = JournalScan(blocks=journal_blocks)

    def feed(self, data: bytes) -> None:
        """Consume whole blocks (len(data) a multiple of bsize) at the next positions."""
        bs = self.bsize
        if len(data) % bs:
            raise ValueError("journal data must be whole blocks")
        headers = self._result.headers
        bad = self._result.bad_headers
        for off in range(0, len(data), bs):
            pos = self._next
            self._next += 1
            if data[off : off + 8] != _LH_PREFIX:
                continue
            rec = check_header(data[off : off + bs], pos)
            if isinstance(rec, HeaderRecord):
                headers.append(rec)
            elif rec is not None:
                bad.append(rec)

    def finish(self) -> JournalScan:
        """Find the head, duplicate sequences and ordering faults among what was fed."""
        res = self._result
        if self._next != self.journal_blocks:
            raise ValueError(f"fed {self._next} blocks of a {self.journal_blocks}-block journal")
        seen: dict[int, list[int]] = {}
        for h in res.headers:
            seen.setdefault(h.sequence, []).append(h.position)
        res.duplicate_sequences = {s: p for s, p in seen.items() if len(p) > 1}
        hs = res.headers
        res.descents = sum(
            1 for i in range(len(hs)) if hs[(i + 1) % len(hs)].sequence < hs[i].sequence
        )
        if hs:
            res.head = max(hs, key=lambda h: (h.sequence, -h.position))
        return res


def scan_blocks(blocks: Iterable[bytes], journal_blocks: int, bsize: int) -> JournalScan:
    """Scan a journal given as an iterable of buffers of whole blocks (pure helper)."""
    scanner = JournalScanner(journal_blocks, bsize)
    for chunk in blocks:
        scanner.feed(chunk)
    return scanner.finish()


async def scan_journal(
    device: Device, extents: list[tuple[int, int]], bsize: int, *, batch_blocks: int = 2048
) -> JournalScan:
    """Read a journal through a `gfspy.blockdev.Device` and scan it.

    `extents` maps the journal in logical order as (first device block, count) runs,
    as its metadata tree says; their counts add up to the journal's length.
    """
    total = sum(n for _, n in extents)
    scanner = JournalScanner(total, bsize)
    for start, count in extents:
        done = 0
        while done < count:
            n = min(batch_blocks, count - done)
            data = await device.read((start + done) * bsize, n * bsize)
            scanner.feed(data)
            done += n
    return scanner.finish()
