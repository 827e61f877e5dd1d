"""The journal we write, judged by the real fsck.gfs2 3.5.0.

Each test journals real changes into journal0 of a fresh mkfs.gfs2 image and leaves it
dirty (no in-place writes), then checks that fsck.gfs2 sees it dirty, replays it the way
we expect, and that our own replay produces the very same bytes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gfspy.blockdev.device import Device
from gfspy.journal.extent import JournalExtents, map_journal
from gfspy.journal.locate import locate_journal
from gfspy.journal.log import Journal, JournalDirtyError, open_journal
from gfspy.journal.replay import HeaderStyle, recover_journal, replay_journal
from gfspy.journal.scan import scan_journal
from gfspy.journal.transaction import Transaction
from gfspy.ondisk.constants import LH_RECOVERY, LH_UNMOUNT

from .helpers import (
    BSIZE,
    assert_fsck_silent,
    data_block,
    free_blocks,
    fsck,
    journal0,
    make_image,
    metadata_block,
    open_device,
    read_block,
    replay_counts,
    root_dinode,
    touched_root,
)


async def replay_ours(path: Path, style: HeaderStyle = "fsck") -> None:
    dev = await open_device(path)
    try:
        _, extents = await journal0(dev)
        result = await replay_journal(dev, extents, jid=0, header_style=style)
        assert result.was_dirty
    finally:
        await dev.aclose()


def replay_both(dirty: Path, tmp_path: Path) -> tuple[Path, Path, str]:
    """Replay copies of `dirty` with fsck.gfs2 -y and with ours (fsck header style)."""
    by_fsck = tmp_path / "by-fsck.img"
    by_us = tmp_path / "by-us.img"
    shutil.copyfile(dirty, by_fsck)
    shutil.copyfile(dirty, by_us)
    run = fsck(by_fsck, "-y")
    assert run.returncode in (0, 1), run.output
    return by_fsck, by_us, run.output


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mkfs", ["mkfs.gfs2", "gfspy-mkfs"])
async def test_dirty_journal_replayed_identically_by_fsck_and_us(tmp_path: Path, mkfs: str) -> None:
    image = make_image(tmp_path / "fs.img", tool=mkfs)
    dev = await open_device(image)
    try:
        root, root_img = await root_dinode(dev)
        spare = await free_blocks(dev, 4)
        journal = await open_journal(dev, 0)

        first = Transaction(BSIZE)
        first.add_metadata(root, touched_root(root_img, 0o700, 1_000_000))
        first.add_metadata(spare[0], metadata_block(spare[0], 1))
        first.add_metadata(spare[1], metadata_block(spare[1], 1))
        await journal.commit(first)

        second = Transaction(BSIZE)  # relogs root and spare[1]: later copies must win
        final_root = touched_root(root_img, 0o751, 2_000_000)
        second.add_metadata(root, final_root)
        second.add_metadata(spare[1], metadata_block(spare[1], 2))
        second.add_jdata(spare[2], data_block(7, starts_with_magic=True))
        second.add_jdata(spare[3], data_block(8))
        await journal.commit(second)
        expected = {
            root: final_root,
            spare[0]: metadata_block(spare[0], 1),
            spare[1]: metadata_block(spare[1], 2),
            spare[2]: data_block(7, starts_with_magic=True),
            spare[3]: data_block(8),
        }
        # Nothing was written in place: the journal alone carries the change.
        assert await dev.read(root * BSIZE, BSIZE) == root_img
        assert journal.ail_blocks == set(expected)
    finally:
        await dev.aclose()

    dirty_bytes = image.read_bytes()
    check = fsck(image, "-n")
    assert check.returncode == 0 and check.dirty, check.output
    assert image.read_bytes() == dirty_bytes, "fsck -n must not write"

    dev = await open_device(image)
    try:
        with pytest.raises(JournalDirtyError):
            await open_journal(dev, 0)
    finally:
        await dev.aclose()

    by_fsck, by_us, output = replay_both(image, tmp_path)
    (meta_done, meta_logged), (jdata_done, jdata_logged) = replay_counts(output)
    assert (meta_done, meta_logged) == (5, 5)  # root twice, spare[1] twice, spare[0]
    assert (jdata_done, jdata_logged) == (2, 2)
    for blkno, image_bytes in expected.items():
        assert read_block(by_fsck, blkno) == image_bytes, f"block {blkno} after fsck -y"

    await replay_ours(by_us)
    assert by_us.read_bytes() == by_fsck.read_bytes()
    assert_fsck_silent(by_us, tmp_path)

    # The kernel-style clean header is just as acceptable to fsck.
    kernel_style = tmp_path / "kernel-style.img"
    kernel_style.write_bytes(dirty_bytes)
    await replay_ours(kernel_style, "kernel")
    for blkno, image_bytes in expected.items():
        assert read_block(kernel_style, blkno) == image_bytes
    assert_fsck_silent(kernel_style, tmp_path)


@pytest.mark.timeout(60)
async def test_revoked_blocks_are_not_replayed(tmp_path: Path) -> None:
    image = make_image(tmp_path / "fs.img")
    dev = await open_device(image)
    try:
        a, b, c = await free_blocks(dev, 3)
        before = {blk: await dev.read(blk * BSIZE, BSIZE) for blk in (a, b, c)}
        journal = await open_journal(dev, 0)

        t1 = Transaction(BSIZE)
        for blk in (a, b, c):
            t1.add_metadata(blk, metadata_block(blk, 1))
        await journal.commit(t1)

        t2 = Transaction(BSIZE)  # a freed; c freed and then logged again later
        t2.revoke(a)
        t2.revoke(c)
        await journal.commit(t2)
        assert a not in journal.ail_blocks, "a freed block must never be written back"

        t3 = Transaction(BSIZE)
        t3.add_metadata(c, metadata_block(c, 3))
        await journal.commit(t3)
    finally:
        await dev.aclose()

    by_fsck, by_us, output = replay_both(image, tmp_path)
    assert replay_counts(output)[0] == (2, 4)  # a and c's first copy are revoked
    assert read_block(by_fsck, a) == before[a]
    assert read_block(by_fsck, b) == metadata_block(b, 1)
    assert read_block(by_fsck, c) == metadata_block(c, 3)
    await replay_ours(by_us)
    assert by_us.read_bytes() == by_fsck.read_bytes()


@pytest.mark.timeout(60)
async def test_revoke_in_same_transaction_cancels_the_copy(tmp_path: Path) -> None:
    image = make_image(tmp_path / "fs.img")
    dev = await open_device(image)
    try:
        (a,) = await free_blocks(dev, 1)
        before = await dev.read(a * BSIZE, BSIZE)
        journal = await open_journal(dev, 0)
        t1 = Transaction(BSIZE)
        t1.add_metadata(a, metadata_block(a, 1))
        await journal.commit(t1)
        t2 = Transaction(BSIZE)  # modified again, then freed, in one transaction
        t2.add_metadata(a, metadata_block(a, 2))
        t2.revoke(a)
        assert t2.metadata == {}
        await journal.commit(t2)
        assert journal.ail_blocks == set()
    finally:
        await dev.aclose()
    by_fsck, by_us, output = replay_both(image, tmp_path)
    # Nothing else was pending, so the revoke also moved the tail past t1: the log
    # left to replay is empty.
    assert replay_counts(output)[0] == (0, 0)
    assert read_block(by_fsck, a) == before
    await replay_ours(by_us)
    assert by_us.read_bytes() == by_fsck.read_bytes()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mkfs", ["mkfs.gfs2", "gfspy-mkfs"])
async def test_clean_unmount_leaves_a_clean_consistent_filesystem(
    tmp_path: Path, mkfs: str
) -> None:
    image = make_image(tmp_path / "fs.img", tool=mkfs)
    dev = await open_device(image)
    try:
        root, root_img = await root_dinode(dev)
        spare = await free_blocks(dev, 3)
        journal = await open_journal(dev, 0)
        for round_ in range(5):
            t = Transaction(BSIZE)
            t.add_metadata(root, touched_root(root_img, 0o700 + round_, 3_000_000 + round_))
            for blk in spare:
                t.add_metadata(blk, metadata_block(blk, round_))
            await journal.commit(t)
            if round_ == 2:
                await journal.write_back([spare[0]])  # the caller's own writeback
        await journal.clean_unmount()
        assert journal.ail_blocks == set()
        with pytest.raises(Exception, match="already unmounted"):
            await journal.commit(Transaction(BSIZE))
        final_root = touched_root(root_img, 0o704, 3_000_004)
        assert await dev.read(root * BSIZE, BSIZE) == final_root
    finally:
        await dev.aclose()

    check = fsck(image, "-n")
    assert not check.dirty, check.output
    assert_fsck_silent(image, tmp_path)
    for blk in spare:
        assert read_block(image, blk) == metadata_block(blk, 4)

    # A remount continues the sequence after the unmount header.
    dev = await open_device(image)
    try:
        again = await Journal.open(dev, BSIZE, (await journal0(dev))[0].journal, jid=0)
        assert again.next_sequence == journal.next_sequence
    finally:
        await dev.aclose()


@pytest.mark.timeout(60)
async def test_mount_replays_its_own_dirty_journal_then_appends(tmp_path: Path) -> None:
    image = make_image(tmp_path / "fs.img")
    dev = await open_device(image)
    try:
        root, root_img = await root_dinode(dev)
        journal = await open_journal(dev, 0)
        t = Transaction(BSIZE)
        t.add_metadata(root, touched_root(root_img, 0o700, 42))
        crashed_at = await journal.commit(t)
    finally:
        await dev.aclose()  # crash with the change only in the log

    dev = await open_device(image)
    try:
        journal = await open_journal(dev, 0, replay_if_dirty=True)
        assert await dev.read(root * BSIZE, BSIZE) == touched_root(root_img, 0o700, 42)
        assert journal.next_sequence == crashed_at + 2  # after replay's clean header
        t = Transaction(BSIZE)
        t.add_metadata(root, touched_root(root_img, 0o750, 43))
        await journal.commit(t)
        await journal.clean_unmount()
    finally:
        await dev.aclose()
    assert read_block(image, root) == touched_root(root_img, 0o750, 43)
    assert_fsck_silent(image, tmp_path)


@pytest.mark.timeout(60)
async def test_survivor_recovers_another_nodes_journal(tmp_path: Path) -> None:
    """Node 1 dies with a transaction in journal1; node 0, with its own journal
    open, recovers journal1 (clean header UNMOUNT|RECOVERY) and fsck.gfs2 -n finds
    nothing to say; fsck.gfs2 -y and our fsck-style replay agree byte for byte."""
    image = make_image(tmp_path / "fs.img", size_mib=40, journals=2)
    dev = await open_device(image)
    try:
        root, root_img = await root_dinode(dev)
        (spare,) = await free_blocks(dev, 1)
        node1 = await open_journal(dev, 1)
        assert node1.extents.dinode_addr != (await journal0(dev))[0].journal
        t = Transaction(BSIZE)
        t.add_metadata(root, touched_root(root_img, 0o711, 77))
        t.add_jdata(spare, data_block(77))
        await node1.commit(t)
    finally:
        await dev.aclose()  # node 1 dies
    check = fsck(image, "-n")
    assert 'Journal #2 ("journal1") is dirty' in check.output, check.output

    by_fsck = tmp_path / "by-fsck.img"
    shutil.copyfile(image, by_fsck)
    assert fsck(by_fsck, "-y").returncode in (0, 1)
    fsck_style = tmp_path / "fsck-style.img"
    shutil.copyfile(image, fsck_style)

    dev = await open_device(image)
    try:
        node0 = await open_journal(dev, 0)  # the survivor's own journal stays usable
        result = await recover_journal(dev, 1, recovery=True)
        assert (result.metadata_replayed, result.jdata_replayed) == (1, 1)
        await node0.clean_unmount()
        scan = await scan_journal(dev, list((await journal1_extents(dev)).runs), BSIZE)
        assert scan.head is not None
        assert scan.head.flags == LH_UNMOUNT | LH_RECOVERY
    finally:
        await dev.aclose()
    assert read_block(image, root) == touched_root(root_img, 0o711, 77)
    assert read_block(image, spare) == data_block(77)
    assert_fsck_silent(image, tmp_path)

    dev = await open_device(fsck_style)
    try:
        await recover_journal(dev, 1, header_style="fsck", fold_statfs=False)
    finally:
        await dev.aclose()
    assert fsck_style.read_bytes() == by_fsck.read_bytes()


async def journal1_extents(dev: Device) -> JournalExtents:
    files = await locate_journal(dev, 1)
    return await map_journal(dev, BSIZE, files.journal)
