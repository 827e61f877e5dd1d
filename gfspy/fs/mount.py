"""Mount-time checks and setup: superblock, lock protocol, journal, rindex, root.

Everything that can refuse a device is here, so that a bad image is rejected with
one clear message before anything is written.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

from gfspy.blockdev.device import Device, DeviceError
from gfspy.fs.types import FsError
from gfspy.journal.extent import JournalLayoutError
from gfspy.journal.locate import LocateError, locate_journal, lookup, read_superblock
from gfspy.journal.log import Journal, JournalDirtyError, open_journal
from gfspy.journal.replay import ReplayError
from gfspy.ondisk.constants import (
    DINODE_SIZE,
    FORMAT_FS,
    FORMAT_FS_MIN,
    FORMAT_MULTI,
    Geometry,
)
from gfspy.ondisk.dinode import Dinode
from gfspy.ondisk.errors import FormatError
from gfspy.ondisk.indirect import unpack_pointers
from gfspy.ondisk.rgrp import RindexEntry, unpack_rindex
from gfspy.ondisk.superblock import Superblock

log = logging.getLogger(__name__)

SUPPORTED_LOCKPROTO = "lock_nolock"


@dataclass
class MountInfo:
    sb: Superblock
    geo: Geometry
    journal: Journal | None
    rindex: list[RindexEntry]
    master_statfs: int
    statfs_change: int
    root: Dinode


def choose_lockproto(sb: Superblock, override: str | None) -> str:
    """The lock protocol to use; FsError(EINVAL) with the reason when refused."""
    on_disk = sb.lockproto
    if on_disk.startswith("fsck_"):
        raise FsError(errno.EINVAL, f"lockproto {on_disk!r}: fsck.gfs2 is running on this device")
    proto = override or on_disk
    if proto.startswith("fsck_"):
        raise FsError(errno.EINVAL, f"lockproto {proto!r} is reserved for fsck.gfs2")
    if proto == "lock_dlm":
        raise FsError(
            errno.EINVAL,
            "superblock asks for lock_dlm, which needs a cluster configuration; "
            "mount with lockproto=lock_nolock for single-node use",
        )
    if proto != SUPPORTED_LOCKPROTO:
        raise FsError(errno.EINVAL, f"unknown lock protocol {proto!r}")
    return proto


async def _read_whole_file(device: Device, geo: Geometry, addr: int, what: str) -> bytes:
    """A small system file's data (stuffed or height 1), e.g. rindex."""
    raw = await device.read(addr * geo.bsize, geo.bsize)
    di = Dinode.unpack(raw)
    if di.height == 0:
        if di.size > geo.stuffed_size:
            raise FormatError(f"{what}: stuffed size {di.size} too large")
        return raw[DINODE_SIZE : DINODE_SIZE + di.size]
    if di.height != 1:
        raise FormatError(f"{what}: height {di.height} not supported for a system file")
    nblocks = -(-di.size // geo.bsize)
    ptrs = unpack_pointers(raw, DINODE_SIZE, min(nblocks, geo.diptrs))
    parts = []
    for ptr in ptrs:
        if ptr == 0 or ptr * geo.bsize >= device.size:
            raise FormatError(f"{what}: bad data pointer {ptr}")
        parts.append(await device.read(ptr * geo.bsize, geo.bsize))
    return b"".join(parts)[: di.size]


async def prepare(device: Device, *, jid: int, readonly: bool, lockproto: str | None) -> MountInfo:
    """Check the device and get the journal ready (replayed if dirty and writable)."""
    try:
        sb = await read_superblock(device)
    except (LocateError, FormatError) as e:
        raise FsError(errno.EINVAL, f"{device.name}: not a GFS2 filesystem ({e})") from None
    if not FORMAT_FS_MIN <= sb.fs_format <= FORMAT_FS or sb.multihost_format != FORMAT_MULTI:
        raise FsError(
            errno.EINVAL,
            f"{device.name}: unsupported on-disk format {sb.fs_format}/{sb.multihost_format}",
        )
    if sb.bsize > 4096 or sb.bsize * 16 > device.size:
        raise FsError(errno.EINVAL, f"{device.name}: unsupported block size {sb.bsize}")
    choose_lockproto(sb, lockproto)
    # lock_nolock trusts that nothing else uses the device: two mounts of one image
    # on this host (or a read-only one beside a writer) are refused before replay.
    try:
        device.claim(exclusive=not readonly)
    except DeviceError as e:
        raise FsError(e.errno or errno.EBUSY, e.strerror or str(e)) from None
    geo = Geometry.for_bsize(sb.bsize)
    try:
        files = await locate_journal(device, jid)
        journal: Journal | None = None
        if not readonly:
            journal = await open_journal(device, jid, replay_if_dirty=True)
        else:
            try:
                probe = await open_journal(device, jid, replay_if_dirty=False)
            except JournalDirtyError:
                raise FsError(
                    errno.EROFS, f"{device.name}: journal{jid} is dirty; mount read-write once"
                ) from None
            del probe
        rindex_addr = await lookup(device, sb.bsize, sb.master_dir.addr, "rindex")
        if rindex_addr is None:
            raise FormatError("master directory has no rindex")
        rindex = unpack_rindex(await _read_whole_file(device, geo, rindex_addr, "rindex"))
        if not rindex:
            raise FormatError("rindex is empty")
        root_raw = await device.read(sb.root_dir.addr * sb.bsize, sb.bsize)
        root = Dinode.unpack(root_raw)
        if root.addr != sb.root_dir.addr or not root.is_dir():
            raise FormatError(f"root dinode {sb.root_dir.addr} is not a directory")
    except JournalDirtyError as e:
        raise FsError(errno.EIO, f"{device.name}: {e}") from None
    except (LocateError, JournalLayoutError, ReplayError, FormatError) as e:
        raise FsError(errno.EIO, f"{device.name}: corrupt filesystem: {e}") from None
    except IndexError as e:
        raise FsError(errno.EIO, f"{device.name}: corrupt filesystem: {e}") from None
    return MountInfo(
        sb=sb,
        geo=geo,
        journal=journal,
        rindex=rindex,
        master_statfs=files.master_statfs,
        statfs_change=files.statfs_change,
        root=root,
    )
