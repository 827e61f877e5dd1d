"""Stream a built filesystem to a Device in large contiguous writes.

Order matters for what a crash leaves behind: the superblock area is zeroed first (so
a half-made filesystem is never mistaken for the old one), then resource groups,
journals and system files are written, flushed, and only then is the new superblock
written and flushed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from gfspy.blockdev.device import Device, DeviceError
from gfspy.ondisk.constants import SB_OFFSET

from .builder import BuiltFilesystem
from .logheaders import journal_blocks

log = logging.getLogger(__name__)

#: Largest single write, in bytes: big enough to stream, small enough to bound memory.
MAX_WRITE = 8 << 20

ProgressFn = Callable[[str, int, int], None]


def _coalesce(blocks: dict[int, bytes], bsize: int, limit: int) -> list[tuple[int, bytes]]:
    """Merge blocks with consecutive addresses into runs of at most `limit` bytes."""
    runs: list[tuple[int, bytes]] = []
    start = -1
    parts: list[bytes] = []
    size = 0
    for addr in sorted(blocks):
        data = blocks[addr]
        if parts and addr == start + size // bsize and size + len(data) <= limit:
            parts.append(data)
            size += len(data)
            continue
        if parts:
            runs.append((start, b"".join(parts)))
        start, parts, size = addr, [data], len(data)
    if parts:
        runs.append((start, b"".join(parts)))
    return runs


#: Largest single discard request (NBD lengths are 32-bit).
MAX_DISCARD = 1 << 30


async def discard_device(dev: Device, length: int) -> bool:
    """Tell the storage that the first `length` bytes are unused, as mkfs.gfs2 does for
    block devices (thin-provisioned LUNs get their space back). Image files are left
    alone. Returns False if the device does not support discard; that is not an error.
    """
    if getattr(dev, "is_blockdev", True) is False:
        return False
    length -= length % dev.block_size
    offset = 0
    while offset < length:
        count = min(MAX_DISCARD, length - offset)
        try:
            await dev.discard(offset, count)
        except DeviceError as e:
            log.info("%s: discard not supported (%s); continuing without it", dev.name, e)
            return False
        offset += count
    log.info("%s: discarded %d bytes", dev.name, length)
    return True


async def write_filesystem(
    dev: Device, fs: BuiltFilesystem, progress: ProgressFn | None = None
) -> None:
    """Write every block of `fs` to `dev`, superblock last, and flush."""
    bsize = fs.layout.bsize
    sb_block = SB_OFFSET // bsize
    # Blocks 0..sb (64 KiB + the superblock block) become zero before anything else.
    await dev.write(0, bytes(SB_OFFSET + bsize))

    rgrps = fs.layout.rgrps
    for i, span in enumerate(rgrps):
        await dev.write(span.addr * bsize, fs.rgrp_blocks(i))
        if progress is not None:
            progress("Writing resource groups", i + 1, len(rgrps))
    log.info("%s: wrote %d resource groups", dev.name, len(rgrps))

    chunk_blocks = max(1, MAX_WRITE // bsize)
    for plan in fs.journals:
        for block, data in journal_blocks(
            bsize=bsize,
            jinode=plan.inum.addr,
            first_block=plan.log_start,
            nblocks=plan.log_blocks,
            start_seq=plan.start_seq,
            chunk_blocks=chunk_blocks,
        ):
            await dev.write(block * bsize, data)
        if progress is not None:
            progress("Writing journals", plan.index + 1, len(fs.journals))
    log.info("%s: wrote %d journals", dev.name, len(fs.journals))

    for addr, data in _coalesce(fs.blocks, bsize, MAX_WRITE):
        await dev.write(addr * bsize, data)
    await dev.flush()
    await dev.write(sb_block * bsize, fs.superblock.pack_block(bsize))
    await dev.flush()
    log.info("%s: superblock written", dev.name)
