"""The metadata buffer cache: one mutable image per block, shared by every operation.

The journal writes blocks in place (write-back from its AIL), so the cache never
writes to the device itself. That makes eviction free for every block not `pinned`:
a block's newest image is always in the cache, in the journal's running transaction,
in its AIL, or on disk, and `read` looks in that order. A pinned block's newest
image exists only here (changed by an operation, not yet handed to the journal), so
it is never evicted or dropped.
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
        #: Blocks whose only up-to-date image is the cached one (owned by the fs).
        self.pinned: set[int] = set()
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
        if blkno not in self.pinned:
            self._blocks.pop(blkno, None)

    def clear(self) -> None:
        """Forget every unpinned image (another node may have changed them)."""
        if not self.pinned:
            self._blocks.clear()
            return
        for blkno in [b for b in self._blocks if b not in self.pinned]:
            del self._blocks[blkno]

    def trim(self) -> None:
        """Evict the oldest unpinned blocks beyond the limit."""
        excess = len(self._blocks) - self.limit
        if excess <= 0:
            return
        victims = []
        for blkno in self._blocks:
            if blkno not in self.pinned:
                victims.append(blkno)
                if len(victims) == excess:
                    break
        for blkno in victims:
            del self._blocks[blkno]
