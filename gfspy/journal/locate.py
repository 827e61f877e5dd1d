"""Finding a journal's files from the superblock: journal{jid} under master/jindex and
its statfs_change{jid} / quota_change{jid} under master/per_node.

Mount, gfspy-fsck and a recovering survivor all need these addresses before the
filesystem layer (with its full directory code) is running, so this module reads the
few system directories itself, read-only. It understands linear (stuffed) directories
and hashed directories whose hash table is still stuffed in the dinode, which is how
every system directory looks until it holds hundreds of entries.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from gfspy.blockdev.device import Device
from gfspy.ondisk.checksums import name_hash
from gfspy.ondisk.constants import DINODE_SIZE, LEAF_HEADER_SIZE, SB_OFFSET
from gfspy.ondisk.dinode import Dinode
from gfspy.ondisk.directory import Leaf, hash_index, live_dirents, unpack_hash_table
from gfspy.ondisk.errors import FormatError
from gfspy.ondisk.superblock import Superblock

log = logging.getLogger(__name__)


class LocateError(FormatError):
    """A system file the journal needs is missing or unreadable."""


@dataclass(frozen=True, slots=True)
class JournalFiles:
    """Block addresses of the files that belong to one journal."""

    jid: int
    bsize: int
    journal: int
    statfs_change: int
    quota_change: int
    master_statfs: int


async def read_superblock(device: Device) -> Superblock:
    """The superblock, read with a 4 KiB request (enough for any block size)."""
    raw = await device.read(SB_OFFSET, 4096)
    try:
        return Superblock.unpack(raw)
    except FormatError as e:
        raise LocateError(f"{device.name}: superblock: {e}") from None


async def _read_dinode(device: Device, bsize: int, addr: int) -> tuple[Dinode, bytes]:
    if addr * bsize >= device.size:
        raise LocateError(f"{device.name}: dinode {addr} is beyond the device")
    raw = await device.read(addr * bsize, bsize)
    try:
        return Dinode.unpack(raw), raw
    except FormatError as e:
        raise LocateError(f"{device.name}: block {addr}: {e}") from None


async def lookup(device: Device, bsize: int, dir_addr: int, name: str) -> int | None:
    """Block address of `name` in directory `dir_addr`, or None if absent."""
    dinode, raw = await _read_dinode(device, bsize, dir_addr)
    if not dinode.is_dir():
        raise LocateError(f"{device.name}: dinode {dir_addr} is not a directory")
    wanted = name.encode()
    try:
        if not dinode.is_exhash():
            if dinode.height != 0:
                raise LocateError(f"{device.name}: linear directory {dir_addr} is not stuffed")
            areas = [(raw, DINODE_SIZE)]
        else:
            if dinode.height != 0:
                raise LocateError(
                    f"{device.name}: directory {dir_addr} has an unstuffed hash table; "
                    f"not supported here"
                )
            table = unpack_hash_table(memoryview(raw)[DINODE_SIZE:], dinode.depth)
            leaf_addr = table[hash_index(name_hash(wanted), dinode.depth)]
            areas = []
            seen = 0
            while leaf_addr:
                seen += 1
                if seen > 1 << 16:
                    raise LocateError(f"{device.name}: leaf chain loops in {dir_addr}")
                leaf_raw = await device.read(leaf_addr * bsize, bsize)
                leaf = Leaf.unpack(leaf_raw)
                areas.append((leaf_raw, LEAF_HEADER_SIZE))
                leaf_addr = leaf.next
        for block, start in areas:
            for _, dirent in live_dirents(block, start, bsize):
                if dirent.name == wanted:
                    return dirent.inum.addr
    except FormatError as e:
        raise LocateError(f"{device.name}: directory {dir_addr}: {e}") from None
    return None


async def locate_journal(device: Device, jid: int) -> JournalFiles:
    """Addresses of journal{jid} and its per-node files; LocateError if missing."""
    sb = await read_superblock(device)
    bsize = sb.bsize
    master = sb.master_dir.addr

    async def need(dir_addr: int, name: str, where: str) -> int:
        addr = await lookup(device, bsize, dir_addr, name)
        if addr is None:
            raise LocateError(f"{device.name}: no {where}/{name}")
        return addr

    jindex = await need(master, "jindex", "master")
    per_node = await need(master, "per_node", "master")
    files = JournalFiles(
        jid=jid,
        bsize=bsize,
        journal=await need(jindex, f"journal{jid}", "jindex"),
        statfs_change=await need(per_node, f"statfs_change{jid}", "per_node"),
        quota_change=await need(per_node, f"quota_change{jid}", "per_node"),
        master_statfs=await need(master, "statfs", "master"),
    )
    log.debug("%s: journal%d files %s", device.name, jid, files)
    return files
