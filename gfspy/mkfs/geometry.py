"""Where mkfs puts the resource groups and journals, computed exactly as mkfs.gfs2 3.5.0.

Pure arithmetic from the device size and the options: no I/O. Matching mkfs.gfs2 block
for block matters because images made by either tool must look the same to fsck.gfs2,
to tunegfs2 and to an operator comparing `gfs2_edit -p rindex` output; the tests check
the rindex of both tools against each other.

The rules (see reference/gfs2-format.md §6.3):

* journals first, one resource group each, sized to hold the journal file exactly
  (dinode + indirect blocks + log blocks, rounded up to 4, plus bitmap blocks);
* the rest is divided into resource groups of the requested size, shrunk evenly so the
  space is used with at most two lengths that differ by one block;
* stripe alignment is not applied: mkfs.gfs2 only aligns when libblkid reports a usable
  RAID topology, which image files and NBD devices never do.
"""

from __future__ import annotations

from dataclasses import dataclass

from gfspy.ondisk.constants import (
    DINODE_SIZE,
    META_HEADER_SIZE,
    RG_HEADER_SIZE,
    SB_OFFSET,
    Geometry,
)

MIN_JOURNAL_MB = 8
MAX_JOURNAL_MB = 1024
MIN_RGSIZE_MB = 32
MAX_RGSIZE_MB = 2048
DEFAULT_RGSIZE_MB = 256
DEFAULT_QCSIZE_MB = 1
MAX_QCSIZE_MB = 64
DEFAULT_BSIZE = 4096
MAX_BSIZE = 4096  # the page size: the kernel cannot mount larger blocks on x86

_BLOCKS_PER_BITMAP_BYTE = 4


class GeometryError(ValueError):
    """The options cannot produce a filesystem on this device; the message says why."""


@dataclass(frozen=True, slots=True)
class RgrpSpan:
    """One resource group: header at `addr`, `length` header+bitmap blocks, then data."""

    addr: int
    length: int
    data0: int
    data: int
    skip: int  # distance to the next rgrp header, 0 for the last one

    @property
    def bitbytes(self) -> int:
        return self.data // _BLOCKS_PER_BITMAP_BYTE

    @property
    def end(self) -> int:
        """First block after this rgrp's data."""
        return self.data0 + self.data


@dataclass(frozen=True, slots=True)
class Layout:
    """Everything geometry decides: block size, sizes and every rgrp, journals first."""

    bsize: int
    device_blocks: int  # whole device, in filesystem blocks
    fs_blocks: int  # blocks mkfs may use (BLOCKS argument or the whole device)
    journals: int
    journal_mb: int
    journal_file_blocks: int  # dinode + indirect + log blocks of one journal
    rgrps: tuple[RgrpSpan, ...]

    @property
    def journal_rgrps(self) -> tuple[RgrpSpan, ...]:
        return self.rgrps[: self.journals]

    @property
    def data_blocks(self) -> int:
        """Σ ri_data: the statfs total."""
        return sum(rg.data for rg in self.rgrps)

    @property
    def fs_size(self) -> int:
        """Blocks up to the end of the last rgrp ("Filesystem size" in the summary)."""
        return self.rgrps[-1].end


def space_for_data(geom: Geometry, nbytes: int) -> int:
    """Blocks a file of `nbytes` occupies: dinode + indirect blocks + data blocks."""
    blocks = (nbytes + geom.bsize - 1) // geom.bsize
    if nbytes <= geom.bsize - DINODE_SIZE:
        return 1
    total = blocks
    pointers = blocks
    while pointers > geom.diptrs:
        pointers = (pointers + geom.inptrs - 1) // geom.inptrs
        total += pointers
    return total + 1


def _bitmap_capacity(bsize: int) -> tuple[int, int]:
    """Blocks described by the RG block's bitmap and by each further RB block."""
    return (
        _BLOCKS_PER_BITMAP_BYTE * (bsize - RG_HEADER_SIZE),
        _BLOCKS_PER_BITMAP_BYTE * (bsize - META_HEADER_SIZE),
    )


def rgsize_for_data(data_blocks: int, bsize: int) -> int:
    """Total rgrp length (header + bitmaps + data) needed for `data_blocks` data blocks."""
    in_rg, in_rb = _bitmap_capacity(bsize)
    data_blocks = (data_blocks + 3) & ~3
    header_blocks = 1
    if data_blocks > in_rg:
        header_blocks += (data_blocks - in_rg + in_rb - 1) // in_rb
    return header_blocks + data_blocks


def split_rgrp(bsize: int, rgblocks: int) -> tuple[int, int]:
    """(ri_length, ri_data) for an rgrp spanning `rgblocks` blocks.

    Reproduces libgfs2's rule including its off-by-one: the data count is computed with
    one more header block than the loop found, then the header count is bumped if the
    bitmaps cannot describe that data. The result always satisfies fsck's check that the
    bitmap capacity covers ri_data, sometimes leaving one block unused.
    """
    in_rg, in_rb = _bitmap_capacity(bsize)
    bitblocks = 0
    while in_rg + in_rb * bitblocks < ((rgblocks - bitblocks) & ~3):
        bitblocks += 1
    mappable = in_rg + in_rb * (bitblocks - 1) if bitblocks > 0 else 0
    data = (rgblocks - (bitblocks + 1)) & ~3
    if mappable < data:
        bitblocks += 1
    return bitblocks, data


def plan_rgrp_lengths(space: int, target: int) -> list[tuple[int, int]]:
    """[(length, count), ...] that fill `space` blocks with rgrps of about `target` blocks.

    When `space` is not a multiple of `target`, one more rgrp is added and every length
    shrinks until they fit, then some are made one block shorter so that no more than one
    adjustment step is left over at the end of the device.
    """
    length = target
    count = space // length
    if space - count * length > 0:
        count += 1
        while (length - 1) * count >= space:
            length -= 1
        short_len, short_count = length - 1, 0
        while length * count + short_len * short_count >= space:
            count -= 1
            short_count += 1
        return [(length, count), (short_len, short_count)]
    return [(length, count)]


def default_journal_blocks(bsize: int, blocks_per_journal: int) -> int | None:
    """Journal length mkfs.gfs2 picks when -J is not given; None if nothing fits.

    The thresholds are in 4 KiB-block units, as in mkfs.gfs2 (they came from e2fsprogs).
    """
    min_blocks = (MIN_JOURNAL_MB << 20) // bsize
    if blocks_per_journal < 2 * min_blocks:
        return None
    for limit, size in (
        (131072, min_blocks),
        (512 * 1024, 4096),
        (2048 * 1024, 8192),
        (4096 * 1024, 16384),
        (262144 * 1024, 32768),
        (2621440 * 1024, 131072),
    ):
        if blocks_per_journal < limit:
            return size
    return 262144


def choose_journal_mb(bsize: int, fs_blocks: int, journals: int, journal_mb: int | None) -> int:
    """Journal size in MiB: the user's (checked against the device) or mkfs's default."""
    if journal_mb is None:
        blocks = default_journal_blocks(bsize, fs_blocks // journals)
        if blocks is None:
            need_mb = journals * 2 * MIN_JOURNAL_MB
            raise GeometryError(
                f"device too small for {journals} journal(s): it must be at least {need_mb} MiB"
            )
        return max(MIN_JOURNAL_MB, (blocks * bsize) >> 20)
    if ((journal_mb * journals) << 20) // bsize > fs_blocks // 2:
        need_mb = 2 * journal_mb * journals
        max_mb = (fs_blocks // 2 * bsize // journals) >> 20
        hint = f"; the largest journal size that fits is {max_mb} MiB" if max_mb >= 8 else ""
        raise GeometryError(
            f"device too small for {journals} journal(s) of {journal_mb} MiB: it must be at "
            f"least {need_mb} MiB{hint}"
        )
    return journal_mb


def compute_layout(
    *,
    device_bytes: int,
    bsize: int = DEFAULT_BSIZE,
    journals: int = 1,
    journal_mb: int | None = None,
    rgsize_mb: int = DEFAULT_RGSIZE_MB,
    fs_blocks: int | None = None,
) -> Layout:
    """Place the journal rgrps and the data rgrps; GeometryError if they do not fit."""
    geom = Geometry.for_bsize(bsize)
    device_blocks = device_bytes // bsize
    if fs_blocks is None:
        fs_blocks = device_blocks
    elif fs_blocks > device_blocks:
        raise GeometryError(
            f"requested size of {fs_blocks} blocks is bigger than the device "
            f"({device_blocks} blocks of {bsize} bytes)"
        )
    jmb = choose_journal_mb(bsize, fs_blocks, journals, journal_mb)
    jfile_blocks = space_for_data(geom, jmb << 20)
    jrg_len = rgsize_for_data(jfile_blocks, bsize)

    spans: list[tuple[int, int]] = []  # (addr, total length)
    addr = SB_OFFSET // bsize + 1
    for _ in range(journals):
        if addr + jrg_len > fs_blocks:
            raise GeometryError(
                f"device too small: journal resource groups end past block {fs_blocks}"
            )
        spans.append((addr, jrg_len))
        addr += jrg_len

    target = (rgsize_mb << 20) // bsize
    for length, count in plan_rgrp_lengths(fs_blocks - addr, target):
        for _ in range(count):
            if length <= 0 or addr + length > fs_blocks:
                break
            spans.append((addr, length))
            addr += length

    rgrps = []
    for i, (rg_addr, total) in enumerate(spans):
        ri_length, ri_data = split_rgrp(bsize, total)
        if ri_data <= 0:
            raise GeometryError("device too small: a resource group would hold no data")
        skip = total if i + 1 < len(spans) else 0
        rgrps.append(RgrpSpan(rg_addr, ri_length, rg_addr + ri_length, ri_data, skip))
    return Layout(
        bsize=bsize,
        device_blocks=device_blocks,
        fs_blocks=fs_blocks,
        journals=journals,
        journal_mb=jmb,
        journal_file_blocks=jfile_blocks,
        rgrps=tuple(rgrps),
    )
