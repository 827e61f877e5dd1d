"""Journal replay: the one algorithm used at mount, by gfspy-fsck, and by a survivor
recovering a dead node's journal.

It is a function over a Device and a journal's extent list so none of those callers
needs a `Journal` object (a survivor must not append to another node's journal).

The algorithm is GFS2's (kernel recovery and fsck.gfs2 agree on it):
  pass 0  walk the log from tail to head: headers are skipped, everything else must be
          a descriptor; remember, for every revoked block, the latest place it was
          revoked;
  pass 1  copy each logged block to its home unless a revoke of it comes later in the
          log (JDATA copies are unescaped);
  clean   write a header one past the head: sequence head+1, UNMOUNT (| RECOVERY when
          another node recovers this journal), tail 0.
Everything is validated before the first in-place write, so a malformed log is refused
(ReplayError) without touching the filesystem: never guess.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal

from gfspy.blockdev.device import Device
from gfspy.journal.extent import (
    JournalExtents,
    map_journal,
    read_log_blocks,
    write_home_blocks,
    write_log_blocks,
)
from gfspy.journal.layout import build_log_body, build_log_header
from gfspy.journal.locate import locate_journal
from gfspy.journal.scan import HeaderRecord, scan_journal
from gfspy.ondisk.constants import (
    DINODE_SIZE,
    LD_JDATA,
    LD_METADATA,
    LD_REVOKE,
    LH_FLUSH_NORMAL,
    LH_RECOVERY,
    LH_UNMOUNT,
    METATYPE_LD,
    METATYPE_LH,
)
from gfspy.ondisk.dinode import Dinode
from gfspy.ondisk.errors import FormatError
from gfspy.ondisk.journal import LogDescriptor, LogHeader, unescape_jdata, unpack_revokes
from gfspy.ondisk.meta import has_magic, peek_type
from gfspy.ondisk.statfs import StatfsChange

log = logging.getLogger(__name__)

#: How the "clean" header is written: "kernel" fills in checksums, addresses and time
#: like the kernel does; "fsck" writes exactly what fsck.gfs2 writes (no lh_crc, no
#: address, no time), so gfspy-fsck and fsck.gfs2 leave byte-identical images.
HeaderStyle = Literal["kernel", "fsck"]

_READ_BATCH = 256  # journal blocks per read in pass 0


class ReplayError(FormatError):
    """The log between tail and head is malformed; nothing was written in place."""


@dataclass(frozen=True, slots=True)
class _Copy:
    """One logged block: where it goes, where it is (offset from the tail)."""

    target: int
    offset: int
    jdata: bool
    escaped: int


@dataclass(frozen=True, slots=True)
class StatfsFiles:
    """The master `statfs` dinode and the replayed journal's `statfs_change` dinode."""

    master: int
    change: int


@dataclass(slots=True)
class ReplayResult:
    """What replay found and did; counts follow fsck.gfs2's "Replayed N of M"."""

    journal: str
    was_dirty: bool
    head: HeaderRecord | None = None
    metadata_logged: int = 0
    metadata_replayed: int = 0
    jdata_logged: int = 0
    jdata_replayed: int = 0
    revokes: int = 0
    blocks_written: int = 0
    clean_header_block: int | None = None
    #: The head's lh_local_* deltas added to the master statfs (when asked to fold).
    statfs_folded: StatfsChange | None = None


async def replay_journal(
    device: Device,
    extents: JournalExtents,
    *,
    jid: int,
    recovery: bool = False,
    header_style: HeaderStyle = "kernel",
    statfs: StatfsFiles | None = None,
    name: str | None = None,
) -> ReplayResult:
    """Replay journal `jid` (mapped by `extents`) if it is dirty, then mark it clean.

    `recovery` is True when a node other than the journal's owner replays it (the
    clean header then carries RECOVERY, as the kernel's does). A clean journal is left
    untouched. Raises ReplayError for anything malformed, before writing in place.

    With `statfs`, the head header's statfs deltas (lh_local_*) are then added to the
    master statfs file and the journal's statfs_change file is zeroed, as the kernel
    does when it recovers a journal; fsck.gfs2 does not (it recomputes the master
    from the bitmaps instead), so gfspy-fsck leaves it out. Unlike the kernel, the
    fold is itself logged as a transaction after the head before it is written in
    place, so a crash during recovery can never add the deltas twice; the clean
    header then follows that transaction instead of sitting at head+1.
    """
    bsize = extents.bsize
    size = extents.blocks
    jname = name or f"journal{jid} ({device.name})"
    scan = await scan_journal(device, list(extents.runs), bsize)
    if scan.head is None:
        raise ReplayError(f"{jname}: no valid log header, cannot find the head")
    if scan.duplicate_sequences:
        seq = min(scan.duplicate_sequences)
        where = ", ".join(str(p) for p in scan.duplicate_sequences[seq])
        raise ReplayError(f"{jname}: sequence {seq} appears at blocks {where}; head is ambiguous")
    head = scan.head
    result = ReplayResult(journal=jname, was_dirty=not head.clean, head=head)
    if head.clean:
        log.info("%s: clean (head at block %d)", jname, head.position)
        return result
    if head.tail >= size:
        raise ReplayError(f"{jname}: head's tail {head.tail} is outside the journal")

    tail = head.tail
    region = (head.position - tail) % size
    log.info(
        "%s: dirty, replaying blocks %d..%d (sequence %d)",
        jname,
        tail,
        head.position,
        head.sequence,
    )
    copies, revoked = await _pass0(device, extents, tail, region, jname)
    result.revokes = len(revoked)

    latest: dict[int, _Copy] = {}
    for copy in copies:
        if copy.jdata:
            result.jdata_logged += 1
        else:
            result.metadata_logged += 1
        r = revoked.get(copy.target)
        if r is not None and r > copy.offset:
            continue  # revoked later in the log: the block was freed or reused
        if copy.jdata:
            result.jdata_replayed += 1
        else:
            result.metadata_replayed += 1
        latest[copy.target] = copy  # later copies win, as in sequential replay

    dev_blocks = device.size // bsize
    for target in latest:
        if target >= dev_blocks:
            raise ReplayError(f"{jname}: logged block {target} is beyond the device")
    # Read the log in windows, in log order, and send each surviving copy home.
    by_offset = sorted(latest.values(), key=lambda c: c.offset)
    i = 0
    while i < len(by_offset):
        start = by_offset[i].offset
        end = min(start + _READ_BATCH, region)
        window = await read_log_blocks(device, extents, (tail + start) % size, end - start)
        home: dict[int, bytes] = {}
        while i < len(by_offset) and by_offset[i].offset < end:
            copy = by_offset[i]
            block = window[copy.offset - start]
            home[copy.target] = unescape_jdata(block, copy.escaped) if copy.jdata else block
            i += 1
        await write_home_blocks(device, bsize, home)
    result.blocks_written = len(latest)
    await device.flush()
    clean_pos = (head.position + 1) % size
    clean_seq = head.sequence + 1
    if statfs is not None:
        delta, images = await _statfs_fold_images(device, extents, head, statfs)
        result.statfs_folded = delta
        if images:
            clean_pos, clean_seq = await _log_and_apply(
                device, extents, images, jid, clean_pos, clean_seq
            )
            log.info("%s: folded statfs change %s into the master statfs", jname, delta)

    await write_log_blocks(
        device,
        extents,
        clean_pos,
        [_clean_header(extents, clean_seq, clean_pos, jid, recovery, header_style)],
    )
    await device.flush()
    result.clean_header_block = clean_pos
    log.info(
        "%s: replayed %d of %d metadata and %d of %d journaled data blocks; "
        "clean header at block %d",
        jname,
        result.metadata_replayed,
        result.metadata_logged,
        result.jdata_replayed,
        result.jdata_logged,
        clean_pos,
    )
    return result


async def _read_stuffed_statfs(
    device: Device, bsize: int, addr: int, what: str
) -> tuple[bytearray, StatfsChange]:
    raw = bytearray(await device.read(addr * bsize, bsize))
    try:
        dinode = Dinode.unpack(raw)
    except FormatError as e:
        raise ReplayError(f"{what} dinode {addr}: {e}") from None
    if dinode.height != 0 or dinode.size < StatfsChange.SIZE:
        raise ReplayError(f"{what} dinode {addr}: not a stuffed {StatfsChange.SIZE}-byte file")
    return raw, StatfsChange.unpack(raw, DINODE_SIZE)


async def _statfs_fold_images(
    device: Device, extents: JournalExtents, head: HeaderRecord, files: StatfsFiles
) -> tuple[StatfsChange, dict[int, bytes]]:
    """The head's lh_local_* deltas, and the new images of the master statfs (deltas
    added) and of statfs_change (zeroed) — only those that change."""
    bsize = extents.bsize
    (head_block,) = await read_log_blocks(device, extents, head.position, 1)
    lh = LogHeader.unpack(head_block)
    delta = StatfsChange(lh.local_total, lh.local_free, lh.local_dinodes)
    master_raw, master = await _read_stuffed_statfs(device, bsize, files.master, "statfs")
    change_raw, change = await _read_stuffed_statfs(device, bsize, files.change, "statfs_change")
    images: dict[int, bytes] = {}
    if delta != StatfsChange():
        master_raw[DINODE_SIZE : DINODE_SIZE + StatfsChange.SIZE] = (master + delta).pack()
        images[files.master] = bytes(master_raw)
    if change != StatfsChange():
        change_raw[DINODE_SIZE : DINODE_SIZE + StatfsChange.SIZE] = StatfsChange().pack()
        images[files.change] = bytes(change_raw)
    return delta, images


async def _log_and_apply(
    device: Device,
    extents: JournalExtents,
    images: dict[int, bytes],
    jid: int,
    position: int,
    sequence: int,
) -> tuple[int, int]:
    """Make the statfs fold idempotent: log the new images as a transaction after the
    replayed head (its header carries zero deltas), then write them in place. A crash
    before that header redoes the whole recovery from the old head; after it, a new
    replay copies the same images again instead of adding the deltas twice.
    Returns where the clean header goes next and its sequence."""
    size = extents.blocks
    bsize = extents.bsize
    body = build_log_body(bsize, {}, images, [])
    if len(body.blocks) + 2 > size - 1:
        raise ReplayError(f"journal of {size} blocks is too small to log the statfs fold")
    await write_log_blocks(device, extents, position, body.blocks)
    await device.flush()
    header_pos = (position + len(body.blocks)) % size
    now = time.time_ns()
    header = build_log_header(
        bsize,
        jid=jid,
        sequence=sequence,
        flags=LH_FLUSH_NORMAL,
        tail=position,
        blkno=header_pos,
        sec=now // 1_000_000_000,
        nsec=now % 1_000_000_000,
        addr=extents.device_block(header_pos),
        jinode=extents.dinode_addr,
    )
    await write_log_blocks(device, extents, header_pos, [header])
    await device.flush()
    for blkno in sorted(images):
        await device.write(blkno * bsize, images[blkno])
    await device.flush()
    return (header_pos + 1) % size, sequence + 1


def _clean_header(
    extents: JournalExtents,
    sequence: int,
    position: int,
    jid: int,
    recovery: bool,
    style: HeaderStyle,
) -> bytes:
    flags = LH_UNMOUNT | (LH_RECOVERY if recovery else 0)
    if style == "fsck":
        return build_log_header(
            extents.bsize,
            jid=0,
            sequence=sequence,
            flags=flags,
            tail=0,
            blkno=position,
            with_crc=False,
        )
    now = time.time_ns()
    return build_log_header(
        extents.bsize,
        jid=jid,
        sequence=sequence,
        flags=flags,
        tail=0,
        blkno=position,
        sec=now // 1_000_000_000,
        nsec=now % 1_000_000_000,
        addr=extents.device_block(position),
        jinode=extents.dinode_addr,
    )


async def _pass0(
    device: Device, extents: JournalExtents, tail: int, region: int, jname: str
) -> tuple[list[_Copy], dict[int, int]]:
    """Walk the log once: validate every descriptor and copy, list the copies, and
    collect revokes with the offset (from the tail) of their latest descriptor."""
    size = extents.blocks
    window: list[bytes] = []
    window_start = 0

    async def block_at(offset: int) -> bytes:
        nonlocal window, window_start
        if not window_start <= offset < window_start + len(window):
            count = min(_READ_BATCH, region - offset)
            window = await read_log_blocks(device, extents, (tail + offset) % size, count)
            window_start = offset
        return window[offset - window_start]

    copies: list[_Copy] = []
    revoked: dict[int, int] = {}
    offset = 0
    while offset < region:
        pos = (tail + offset) % size
        block = await block_at(offset)
        mh_type = peek_type(block)
        if mh_type == METATYPE_LH:
            if not LogHeader.verify(block):
                raise ReplayError(f"{jname}: damaged log header at block {pos} inside the log")
            offset += 1
            continue
        if mh_type != METATYPE_LD:
            raise ReplayError(f"{jname}: block {pos} is neither a log header nor a descriptor")
        try:
            ld = LogDescriptor.unpack(block)
        except FormatError as e:
            raise ReplayError(f"{jname}: descriptor at block {pos}: {e}") from None
        if ld.length < 1 or offset + ld.length > region:
            raise ReplayError(
                f"{jname}: descriptor at block {pos} spans {ld.length} blocks, "
                f"past the head of the log"
            )
        if ld.ld_type in (LD_METADATA, LD_JDATA):
            if ld.length != ld.data1 + 1:
                raise ReplayError(
                    f"{jname}: descriptor at block {pos}: length {ld.length} for {ld.data1} blocks"
                )
            jdata = ld.ld_type == LD_JDATA
            for i, target in enumerate(ld.blocks):
                copy_offset = offset + 1 + i
                if target == 0:
                    raise ReplayError(f"{jname}: descriptor at block {pos} logs block 0")
                if not jdata and not has_magic(await block_at(copy_offset)):
                    raise ReplayError(
                        f"{jname}: logged copy of metadata block {target} at journal "
                        f"block {(tail + copy_offset) % size} lacks the GFS2 magic"
                    )
                escaped = ld.escaped[i] if jdata else 0
                if escaped not in (0, 1):
                    raise ReplayError(
                        f"{jname}: descriptor at block {pos}: escape flag {escaped} for "
                        f"block {target}"
                    )
                copies.append(_Copy(target, copy_offset, jdata, escaped))
        elif ld.ld_type == LD_REVOKE:
            span = [await block_at(offset + i) for i in range(ld.length)]
            try:
                numbers = unpack_revokes(span)
            except FormatError as e:
                raise ReplayError(f"{jname}: revoke list at block {pos}: {e}") from None
            for blkno in numbers:
                revoked[blkno] = offset
        else:
            raise ReplayError(f"{jname}: descriptor at block {pos} has unknown type {ld.ld_type}")
        offset += ld.length
    return copies, revoked


async def recover_journal(
    device: Device,
    jid: int,
    *,
    recovery: bool = False,
    header_style: HeaderStyle = "kernel",
    fold_statfs: bool = True,
) -> ReplayResult:
    """Find journal `jid` of the filesystem on `device` by name and replay it if dirty.

    The entry point for mount (own journal, `recovery=False`) and for a survivor
    recovering a dead node (`recovery=True`, only after that node is fenced and its
    journal lock is held). gfspy-fsck passes header_style="fsck", fold_statfs=False
    to do exactly what fsck.gfs2 does.
    """
    files = await locate_journal(device, jid)
    extents = await map_journal(device, files.bsize, files.journal)
    statfs = StatfsFiles(files.master_statfs, files.statfs_change) if fold_statfs else None
    return await replay_journal(
        device,
        extents,
        jid=jid,
        recovery=recovery,
        header_style=header_style,
        statfs=statfs,
    )
