"""Recovery folds the dead node's statfs deltas (lh_local_*) into the master statfs.

A transaction allocates one block the way the filesystem will (bitmap, rg_free,
rg_crc, the root's xattr pointing at it, this node's statfs_change) and carries the
statfs delta in its header; the node then crashes. After our replay with folding,
fsck.gfs2 -n must find the master statfs right; fsck.gfs2 -y (which recomputes the
master from the bitmaps instead) must end with the same master statfs.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from gfspy.blockdev.local import LocalDevice
from gfspy.journal.locate import JournalFiles, locate_journal
from gfspy.journal.log import open_journal
from gfspy.journal.replay import recover_journal, replay_journal
from gfspy.journal.scan import scan_journal
from gfspy.journal.transaction import Transaction
from gfspy.ondisk.constants import (
    BLKST_USED,
    DINODE_SIZE,
    EAFLAG_LAST,
    EATYPE_USR,
    LH_RECOVERY,
    LH_UNMOUNT,
    META_HEADER_SIZE,
    STATFS_CHANGE_SIZE,
)
from gfspy.ondisk.rgrp import RgrpHeader, extract_bitmap, pack_rgrp_blocks, set_state
from gfspy.ondisk.statfs import StatfsChange
from gfspy.ondisk.xattr import EARecord, pack_ea_block

from .helpers import (
    BSIZE,
    RecordingDevice,
    assert_fsck_silent,
    build_image,
    crash_states,
    free_blocks,
    fsck,
    journal0,
    last_rgrp,
    make_image,
    open_device,
    read_block,
    root_dinode,
)


def statfs_of(path: Path, addr: int) -> StatfsChange:
    return StatfsChange.unpack(read_block(path, addr), DINODE_SIZE)


async def crashed_after_allocation(tmp_path: Path) -> tuple[Path, JournalFiles]:
    """An image whose node allocated one block in a committed transaction (statfs
    delta free -1 in the header) and died before writing anything in place."""
    image = make_image(tmp_path / "fs.img")
    dev = await open_device(image)
    try:
        files = await locate_journal(dev, 0)
        root, root_img = await root_dinode(dev)
        (blk,) = await free_blocks(dev, 1)
        rg, rg_blocks = await last_rgrp(dev)
        journal = await open_journal(dev, 0)

        t = Transaction(BSIZE)
        bitmap = extract_bitmap(rg_blocks, BSIZE, rg.bitbytes)
        set_state(bitmap, blk - rg.data0, BLKST_USED)
        header = RgrpHeader.unpack(rg_blocks[0])
        header.free -= 1
        for i, new in enumerate(pack_rgrp_blocks(header, bitmap, BSIZE, rg.length)):
            if new != rg_blocks[i]:
                t.add_metadata(rg.addr + i, new)
        xattr = EARecord(
            BSIZE - META_HEADER_SIZE, 1, 1, EATYPE_USR, EAFLAG_LAST, name=b"k", value=b"v"
        )
        t.add_metadata(blk, pack_ea_block(BSIZE, [xattr]))
        root_new = bytearray(root_img)
        struct.pack_into(">Q", root_new, 168, blk)  # di_eattr
        struct.pack_into(">Q", root_new, 64, struct.unpack_from(">Q", root_img, 64)[0] + 1)
        t.add_metadata(root, bytes(root_new))
        change_raw = bytearray(await dev.read(files.statfs_change * BSIZE, BSIZE))
        change_raw[DINODE_SIZE : DINODE_SIZE + STATFS_CHANGE_SIZE] = StatfsChange(0, -1, 0).pack()
        t.add_metadata(files.statfs_change, bytes(change_raw))
        t.change_statfs(free=-1)
        await journal.commit(t)
        assert journal.statfs_local == [0, -1, 0]
    finally:
        await dev.aclose()  # the node dies here
    return image, files


@pytest.mark.timeout(60)
async def test_replay_folds_statfs_deltas_like_the_kernel(tmp_path: Path) -> None:
    image, files = await crashed_after_allocation(tmp_path)
    master_before = statfs_of(image, files.master_statfs)

    by_fsck = tmp_path / "by-fsck.img"
    shutil.copyfile(image, by_fsck)
    unfolded = tmp_path / "unfolded.img"
    shutil.copyfile(image, unfolded)
    assert fsck(by_fsck, "-y").returncode in (0, 1)

    dev = await open_device(image)
    try:  # a survivor recovering the dead node's journal
        result = await recover_journal(dev, 0, recovery=True)
        assert result.statfs_folded == StatfsChange(0, -1, 0)
        _, extents = await journal0(dev)
        scan = await scan_journal(dev, list(extents.runs), BSIZE)
        assert scan.head is not None and scan.head.position == result.clean_header_block
        assert scan.head.flags == LH_UNMOUNT | LH_RECOVERY and scan.head.tail == 0
    finally:
        await dev.aclose()
    master_after = statfs_of(image, files.master_statfs)
    assert master_after == StatfsChange(
        master_before.total, master_before.free - 1, master_before.dinodes
    )
    assert statfs_of(image, files.statfs_change) == StatfsChange()
    assert master_after == statfs_of(by_fsck, files.master_statfs)
    assert_fsck_silent(image, tmp_path)

    # Without folding the master statfs is stale, and fsck.gfs2 says so.
    dev = await open_device(unfolded)
    try:
        _, extents = await journal0(dev)
        await replay_journal(dev, extents, jid=0)
    finally:
        await dev.aclose()
    assert "statfs file is wrong" in fsck(unfolded, "-n").output


@pytest.mark.timeout(120)
async def test_crash_during_recovery_never_folds_twice(tmp_path: Path) -> None:
    image, files = await crashed_after_allocation(tmp_path)
    master_before = statfs_of(image, files.master_statfs)
    expected = StatfsChange(master_before.total, master_before.free - 1, master_before.dinodes)
    base = tmp_path / "dead-node.img"
    shutil.copyfile(image, base)
    recorder = RecordingDevice(await LocalDevice.open(str(image)))
    try:
        await recover_journal(recorder, 0, recovery=True)
    finally:
        await recorder.aclose()
    states = crash_states(recorder.epochs)
    assert len(states) > 8
    for index, (label, writes) in enumerate(states):
        crashed = build_image(base, writes, tmp_path / f"crash{index}.img")
        dev = await open_device(crashed)
        try:  # another survivor retries the recovery
            await recover_journal(dev, 0, recovery=True)
        finally:
            await dev.aclose()
        assert statfs_of(crashed, files.master_statfs) == expected, label
        assert statfs_of(crashed, files.statfs_change) == StatfsChange(), label
        if index % 3 == 0:
            assert_fsck_silent(crashed, tmp_path)
        crashed.unlink()
