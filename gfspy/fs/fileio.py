"""File contents: stuffed data in the dinode, or data blocks through the block map.

Data is not journaled (ordered mode): it is written to its blocks at once, before the
transaction that makes the metadata point at it is committed. Contiguous blocks go
out in one device write, and holes read as zeros without touching the device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from gfspy.blockdev.device import Device
from gfspy.fs.alloc import Allocator
from gfspy.fs.bmap import BlockMap
from gfspy.fs.buffers import BufferCache
from gfspy.fs.inode import Inode
from gfspy.fs.txn import FsTxn
from gfspy.ondisk.constants import DINODE_SIZE, Geometry

log = logging.getLogger(__name__)


def _runs(blocks: list[int], first_lblock: int) -> list[tuple[int, int, int]]:
    """(lblock, pblock, count) runs of physically contiguous blocks; pblock 0 = hole."""
    runs: list[tuple[int, int, int]] = []
    for i, blk in enumerate(blocks):
        if runs:
            lb, pb, n = runs[-1]
            if (blk == 0 and pb == 0) or (blk and pb and blk == pb + n):
                runs[-1] = (lb, pb, n + 1)
                continue
        runs.append((first_lblock + i, blk, 1))
    return runs


@dataclass(slots=True)
class ReadPlan:
    """A read resolved to device extents: `inline` bytes (stuffed data), or `runs` of
    (first block, count) with block 0 a hole, of which `length` bytes from `skip` on."""

    inline: bytes | None
    runs: list[tuple[int, int]]
    skip: int
    length: int


class FileData:
    def __init__(
        self, device: Device, cache: BufferCache, alloc: Allocator, bmap: BlockMap, geo: Geometry
    ) -> None:
        self.device = device
        self.cache = cache
        self.alloc = alloc
        self.bmap = bmap
        self.geo = geo
        self.bsize = geo.bsize

    async def read(self, ip: Inode, offset: int, size: int) -> bytes:
        return await self.fetch(await self.plan_read(ip, offset, size))

    async def plan_read(self, ip: Inode, offset: int, size: int) -> ReadPlan:
        """Where the bytes of [offset, offset+size) are: everything a read needs from
        the metadata, so the device reads can run without the mount lock."""
        end = min(ip.di.size, offset + size)
        if offset >= end:
            return ReadPlan(b"", [], 0, 0)
        if ip.di.height == 0:
            buf = await self.cache.read(ip.addr)
            return ReadPlan(bytes(buf[DINODE_SIZE + offset : DINODE_SIZE + end]), [], 0, 0)
        bs = self.bsize
        lo = offset // bs
        hi = -(-end // bs)
        runs = [(pb, n) for _lb, pb, n in _runs(await self.bmap.map(ip, lo, hi), lo)]
        return ReadPlan(None, runs, offset - lo * bs, end - offset)

    async def fetch(self, plan: ReadPlan) -> bytes:
        if plan.inline is not None:
            return plan.inline
        bs = self.bsize
        parts = []
        for pb, n in plan.runs:
            if pb == 0:
                parts.append(bytes(n * bs))
            else:
                parts.append(await self.device.read(pb * bs, n * bs))
        data = b"".join(parts)
        return data[plan.skip : plan.skip + plan.length]

    async def unstuff(self, txn: FsTxn, ip: Inode) -> None:
        """Move stuffed data into a data block; the dinode then holds pointers."""
        buf = await self.cache.read(ip.addr)
        size = ip.di.size
        data = bytes(buf[DINODE_SIZE : DINODE_SIZE + size])
        buf[DINODE_SIZE:] = bytes(self.bsize - DINODE_SIZE)
        txn.dirty.add(ip.addr)
        txn.inodes.add(ip)
        ip.di.height = 1
        if size:
            blocks, _ = await self.bmap.allocate(txn, ip, 0, 1)
            await self.device.write(blocks[0] * self.bsize, data + bytes(self.bsize - size))

    async def write(self, txn: FsTxn, ip: Inode, offset: int, data: bytes) -> int:
        end = offset + len(data)
        if not data:
            return 0
        if ip.di.height == 0 and end <= self.geo.stuffed_size:
            buf = await self.cache.read(ip.addr)
            buf[DINODE_SIZE + offset : DINODE_SIZE + end] = data
            txn.dirty.add(ip.addr)
            if end > ip.di.size:
                ip.di.size = end
            txn.inodes.add(ip)
            return len(data)
        if ip.di.height == 0:
            await self.unstuff(txn, ip)
        bs = self.bsize
        lo = offset // bs
        hi = -(-end // bs)
        height = self.bmap.height_for_blocks(hi)
        if height > ip.di.height:
            await self.bmap.grow_height(txn, ip, height)
        blocks, new = await self.bmap.allocate(txn, ip, lo, hi)
        view = memoryview(data)
        for lb, pb, n in _runs(blocks, lo):
            run_start = lb * bs
            run_end = run_start + n * bs
            src_start = max(offset, run_start)
            src_end = min(end, run_end)
            if src_start == run_start and src_end == run_end:
                await self.device.write(pb * bs, view[src_start - offset : src_end - offset])
                continue
            # A partly written edge block keeps its old bytes (zeros if it is new).
            image = bytearray(n * bs)
            head_read = src_start > run_start and lb not in new
            if head_read:
                image[:bs] = await self.device.read(pb * bs, bs)
            last = lb + n - 1
            if src_end < run_end and last not in new and not (n == 1 and head_read):
                image[(n - 1) * bs :] = await self.device.read((pb + n - 1) * bs, bs)
            image[src_start - run_start : src_end - run_start] = view[
                src_start - offset : src_end - offset
            ]
            await self.device.write(pb * bs, image)
        if end > ip.di.size:
            ip.di.size = end
        txn.inodes.add(ip)
        return len(data)

    async def truncate(self, txn: FsTxn, ip: Inode, size: int) -> None:
        old = ip.di.size
        bs = self.bsize
        if size < old:
            if ip.di.height == 0:
                buf = await self.cache.read(ip.addr)
                buf[DINODE_SIZE + size : DINODE_SIZE + old] = bytes(old - size)
                txn.dirty.add(ip.addr)
            else:
                keep = -(-size // bs)
                await self.bmap.truncate(txn, ip, keep, metadata_data=False)
                if size % bs:
                    (blk,) = await self.bmap.map(ip, keep - 1, keep)
                    if blk:
                        image = bytearray(await self.device.read(blk * bs, bs))
                        image[size % bs :] = bytes(bs - size % bs)
                        await self.device.write(blk * bs, image)
                if size == 0:
                    ip.di.height = 0
                    ip.di.goal_meta = ip.di.goal_data = ip.addr
        elif size > old and ip.di.height == 0 and size > self.geo.stuffed_size:
            await self.unstuff(txn, ip)
        ip.di.size = size
        txn.inodes.add(ip)
