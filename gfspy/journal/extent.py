"""Where a journal's logical blocks live on the device.

A journal is an ordinary (system) file, so its blocks are found through the dinode's
metadata tree. mkfs.gfs2 lays journals out contiguously, but a journal made or grown
by another tool need not be, and writing log blocks to a guessed address would corrupt
whatever really lives there, so the tree is walked and its runs recorded.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, field

from gfspy.blockdev.device import Device
from gfspy.ondisk.constants import DINODE_SIZE, META_HEADER_SIZE, SB_OFFSET
from gfspy.ondisk.dinode import Dinode
from gfspy.ondisk.errors import FormatError
from gfspy.ondisk.indirect import unpack_indirect_block, unpack_pointers

log = logging.getLogger(__name__)


class JournalLayoutError(FormatError):
    """The journal dinode or its metadata tree cannot describe a usable journal."""


@dataclass(frozen=True, slots=True)
class JournalExtents:
    """A journal's blocks as runs of consecutive device blocks, in logical order.

    `runs` uses the (first device block, count) shape that `scan_journal` takes.
    """

    dinode_addr: int
    bsize: int
    runs: tuple[tuple[int, int], ...]
    _starts: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _blocks: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        starts = []
        total = 0
        for _, count in self.runs:
            starts.append(total)
            total += count
        object.__setattr__(self, "_starts", tuple(starts))
        object.__setattr__(self, "_blocks", total)

    @property
    def blocks(self) -> int:
        """Length of the journal in blocks (the size of the log ring)."""
        return self._blocks

    def device_block(self, lblk: int) -> int:
        """Device block holding journal block `lblk` (0 <= lblk < blocks)."""
        if not 0 <= lblk < self.blocks:
            raise IndexError(f"journal block {lblk} outside 0..{self.blocks - 1}")
        starts = self._starts
        i = bisect.bisect_right(starts, lblk) - 1
        first, _ = self.runs[i]
        return first + (lblk - starts[i])

    def device_runs(self, lblk: int, count: int) -> list[tuple[int, int, int]]:
        """Split journal blocks lblk..lblk+count-1 (wrapping around the ring) into
        (offset into the request, first device block, count) pieces that are each
        contiguous on the device, so callers can do one I/O per piece."""
        pieces: list[tuple[int, int, int]] = []
        starts = self._starts
        done = 0
        while done < count:
            pos = (lblk + done) % self.blocks
            i = bisect.bisect_right(starts, pos) - 1
            first, run_len = self.runs[i]
            within = pos - starts[i]
            n = min(run_len - within, count - done)
            pieces.append((done, first + within, n))
            done += n
        return pieces


def _coalesce(pointers: list[int]) -> tuple[tuple[int, int], ...]:
    runs: list[list[int]] = []
    for p in pointers:
        if runs and runs[-1][0] + runs[-1][1] == p:
            runs[-1][1] += 1
        else:
            runs.append([p, 1])
    return tuple((a, n) for a, n in runs)


async def map_journal(device: Device, bsize: int, dinode_addr: int) -> JournalExtents:
    """Read a journal dinode and its metadata tree and return its block runs.

    Refuses (JournalLayoutError) anything a log could not safely be written through:
    a block that is not a dinode for this address, a size that is not whole blocks,
    a stuffed journal, holes, pointers beyond the device, or IN blocks of the wrong
    type. Nothing is guessed.
    """
    dev_blocks = device.size // bsize
    sb_block = SB_OFFSET // bsize
    raw = await device.read(dinode_addr * bsize, bsize)
    where = f"journal dinode {dinode_addr}"
    try:
        dinode = Dinode.unpack(raw)
    except FormatError as e:
        raise JournalLayoutError(f"{where}: {e}") from None
    no_addr, size, height = dinode.addr, dinode.size, dinode.height
    if no_addr != dinode_addr:
        raise JournalLayoutError(f"{where}: no_addr is {no_addr}")
    if size == 0 or size % bsize:
        raise JournalLayoutError(f"{where}: size {size} is not a whole number of blocks")
    if height == 0:
        raise JournalLayoutError(f"{where}: stuffed (height 0), not a journal")
    nblocks = size // bsize
    inptrs = (bsize - META_HEADER_SIZE) // 8
    diptrs = (bsize - DINODE_SIZE) // 8
    span = inptrs ** (height - 1)  # data blocks covered by one dinode pointer
    if nblocks > diptrs * span:
        raise JournalLayoutError(f"{where}: size {size} needs a taller tree than {height}")

    pointers: list[int] = []

    def check_pointer(ptr: int, parent: str) -> None:
        if ptr == 0:
            raise JournalLayoutError(f"{parent}: hole at journal block {len(pointers)}")
        if ptr >= dev_blocks:
            raise JournalLayoutError(f"{parent}: pointer {ptr} beyond device ({dev_blocks})")
        if ptr <= sb_block:
            raise JournalLayoutError(f"{parent}: pointer {ptr} into the superblock area")

    async def walk(slots: list[int], level_span: int, parent: str) -> None:
        """Collect the data pointers under one block's pointer slots, in order."""
        for ptr in slots:
            if len(pointers) >= nblocks:
                return
            check_pointer(ptr, parent)
            if level_span == 1:
                pointers.append(ptr)
                continue
            child_name = f"{where}: indirect block {ptr}"
            try:
                child = unpack_indirect_block(await device.read(ptr * bsize, bsize))
            except FormatError as e:
                raise JournalLayoutError(f"{child_name}: {e}") from None
            await walk(child, level_span // inptrs, child_name)

    await walk(unpack_pointers(raw, DINODE_SIZE, diptrs), span, where)
    if len(pointers) != nblocks:
        raise JournalLayoutError(f"{where}: tree maps {len(pointers)} of {nblocks} blocks")
    if len(set(pointers)) != nblocks:
        raise JournalLayoutError(f"{where}: a device block is mapped twice")
    extents = JournalExtents(dinode_addr, bsize, _coalesce(pointers))
    log.debug("%s: %d blocks in %d run(s)", where, nblocks, len(extents.runs))
    return extents


async def read_log_blocks(
    device: Device, extents: JournalExtents, lblk: int, count: int
) -> list[bytes]:
    """Read journal blocks lblk..lblk+count-1 (wrapping), one I/O per device run."""
    bs = extents.bsize
    out: list[bytes] = []
    for _, dev_block, n in extents.device_runs(lblk, count):
        data = await device.read(dev_block * bs, n * bs)
        out.extend(data[i * bs : (i + 1) * bs] for i in range(n))
    return out


async def write_log_blocks(
    device: Device, extents: JournalExtents, lblk: int, blocks: list[bytes]
) -> None:
    """Write consecutive journal blocks from lblk on (wrapping), one I/O per run."""
    bs = extents.bsize
    for offset, dev_block, n in extents.device_runs(lblk, len(blocks)):
        await device.write(dev_block * bs, b"".join(blocks[offset : offset + n]))


async def write_home_blocks(device: Device, bsize: int, images: dict[int, bytes]) -> None:
    """Write block images to their home (in-place) addresses, one I/O per run of
    adjacent blocks (capped at 1 MiB-ish), in block order."""
    order = sorted(images)
    limit = max(1, (1 << 20) // bsize)
    i = 0
    while i < len(order):
        j = i + 1
        while j < len(order) and order[j] == order[j - 1] + 1 and j - i < limit:
            j += 1
        await device.write(order[i] * bsize, b"".join(images[b] for b in order[i:j]))
        i = j
