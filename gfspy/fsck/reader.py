"""Block access for the checker: large batched reads through a read-only Device.

The checker touches every metadata block once or twice; reading one block per call would
cost a thread hop each, so callers hand over whole runs (an rgrp's header and bitmaps, a
contiguous range of dinodes) and the reader splits them into a few big reads.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable

from gfspy.blockdev import Device

log = logging.getLogger(__name__)

#: The largest single read the reader issues, in bytes.
MAX_READ_BYTES = 8 << 20
#: How many single blocks to keep in the cache.
CACHE_BLOCKS = 65536


class OutOfDevice(Exception):
    """A block number beyond the end of the device (a truncated image or a bad pointer)."""

    def __init__(self, block: int, device_blocks: int) -> None:
        super().__init__(f"block {block} is beyond the end of the device ({device_blocks} blocks)")
        self.block = block
        self.device_blocks = device_blocks


def contiguous_runs(blocks: Iterable[int], max_run: int) -> list[tuple[int, int]]:
    """Group sorted distinct block numbers into (start, count) runs of at most max_run."""
    runs: list[tuple[int, int]] = []
    start = prev = -2
    for b in sorted(set(blocks)):
        if b == prev + 1 and b - start < max_run:
            prev = b
            continue
        if start >= 0:
            runs.append((start, prev - start + 1))
        start = prev = b
    if start >= 0:
        runs.append((start, prev - start + 1))
    return runs


class BlockReader:
    """Reads filesystem blocks of `bsize` bytes; caches single blocks for re-reads."""

    def __init__(self, device: Device, bsize: int) -> None:
        self.device = device
        self.bsize = bsize
        self.device_blocks = device.size // bsize
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self.bytes_read = 0

    def in_device(self, block: int) -> bool:
        return 0 <= block < self.device_blocks

    async def read_run(self, start: int, count: int) -> bytes:
        """Read `count` blocks from `start` as one buffer (split into large reads)."""
        if start < 0 or start + count > self.device_blocks:
            raise OutOfDevice(max(start, self.device_blocks), self.device_blocks)
        per_read = max(1, MAX_READ_BYTES // self.bsize)
        parts = []
        done = 0
        while done < count:
            n = min(per_read, count - done)
            parts.append(await self.device.read((start + done) * self.bsize, n * self.bsize))
            done += n
        self.bytes_read += count * self.bsize
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def block(self, blockno: int) -> bytes:
        """One block, from the cache when it was read before."""
        data = self._cache.get(blockno)
        if data is not None:
            self._cache.move_to_end(blockno)
            return data
        data = await self.read_run(blockno, 1)
        self._remember(blockno, data)
        return data

    async def blocks(self, blocknos: Iterable[int], max_run: int = 256) -> dict[int, bytes]:
        """Many blocks, read as contiguous runs; blocks outside the device are left out."""
        wanted = [b for b in set(blocknos) if self.in_device(b)]
        result: dict[int, bytes] = {}
        missing = []
        for b in wanted:
            cached = self._cache.get(b)
            if cached is None:
                missing.append(b)
            else:
                result[b] = cached
        bs = self.bsize
        for start, count in contiguous_runs(missing, max_run):
            buf = await self.read_run(start, count)
            for i in range(count):
                data = buf[i * bs : (i + 1) * bs]
                result[start + i] = data
                self._remember(start + i, data)
        return result

    def _remember(self, blockno: int, data: bytes) -> None:
        self._cache[blockno] = data
        if len(self._cache) > CACHE_BLOCKS:
            self._cache.popitem(last=False)
