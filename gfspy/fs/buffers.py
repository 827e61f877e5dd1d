"""The metadata buffer cache: one mutable image per block, shared by every operation.

The journal writes blocks in place (write-back from its AIL), so the cache never
writes to the device itself. That makes eviction free: a block's newest image is
always in the cache, in the journal's running transaction, in its AIL, or on disk,
and `read` looks in that order.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from gfspy.blockdev.device import Device
from gfspy.journal.log import Journal

log = logging.getLogger(__name__)


class BufferCache:
    """Block number -> bytearray image, least recently used dropped first."""

    def __init__(self, device: Device, bsize: int, limit: int = 32768) -> None:
        self.device = device
        self.bsize = bsize
        self.limit = limit
        self.journal: Journal | None = None
        self._blocks: OrderedDict[int, bytearray] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def cached(self, blkno: int) -> bytearray | None:
        buf = self._blocks.get(blkno)
        if buf is not None:
            self._blocks.move_to_end(blkno)
        return buf

    async def read(self, blkno: int) -> bytearray:
        """The live image of `blkno`; callers modify it in place inside a transaction."""
        buf = self._blocks.get(blkno)
        if buf is not None:
            self.hits += 1
            self._blocks.move_to_end(blkno)
            return buf
        self.misses += 1
        image: bytes | None = None
        if self.journal is not None:
            image = self.journal.pending_image(blkno) or self.journal.ail_image(blkno)
        if image is None:
            image = await self.device.read(blkno * self.bsize, self.bsize)
        buf = self._blocks.get(blkno)  # another task may have loaded it meanwhile
        if buf is None:
            buf = bytearray(image)
            self._blocks[blkno] = buf
        return buf

    def new(self, blkno: int, image: bytes | bytearray) -> bytearray:
        """Install the image of a freshly allocated block without reading the disk."""
        buf = bytearray(image)
        self._blocks[blkno] = buf
        self._blocks.move_to_end(blkno)
        return buf

    def drop(self, blkno: int) -> None:
        self._blocks.pop(blkno, None)

    def clear(self) -> None:
        """Forget every cached image (another node may have changed them)."""
        self._blocks.clear()

    def trim(self, keep: set[int] | None = None) -> None:
        """Evict the oldest blocks beyond the limit (only between transactions)."""
        while len(self._blocks) > self.limit:
            blkno, _ = self._blocks.popitem(last=False)
            if keep and blkno in keep:
                self._blocks[blkno] = _
                break
