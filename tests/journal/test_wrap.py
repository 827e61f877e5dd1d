"""Many transactions around the 8 MiB (2048-block) journal ring several times: forced
and explicit checkpoints, head finding after every few commits, and a final dirty log
that straddles the end of the ring, replayed by fsck.gfs2 and by us."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gfspy.journal.log import open_journal
from gfspy.journal.replay import replay_journal
from gfspy.journal.scan import scan_journal
from gfspy.journal.transaction import Transaction

from .helpers import (
    BSIZE,
    assert_fsck_silent,
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

BLOCKS_PER_TXN = 40
LAPS = 3
# Disjoint groups, so a transaction's blocks are not all relogged (which would free
# its log space without any write-back) before the ring comes round again.
GROUPS = 60


async def assert_same_replay(image: Path, tmp_path: Path) -> None:
    """Replay a snapshot of the live (mounted, so dirty) image with fsck.gfs2 -y and
    with ours: both must find the same head and tail and write the same bytes."""
    by_fsck = tmp_path / "snap-fsck.img"
    by_us = tmp_path / "snap-us.img"
    shutil.copyfile(image, by_fsck)
    shutil.copyfile(image, by_us)
    assert fsck(by_fsck, "-y").returncode in (0, 1)
    dev = await open_device(by_us)
    try:
        _, extents = await journal0(dev)
        await replay_journal(dev, extents, jid=0, header_style="fsck")
    finally:
        await dev.aclose()
    assert by_us.read_bytes() == by_fsck.read_bytes()
    by_fsck.unlink()
    by_us.unlink()


@pytest.mark.timeout(120)
async def test_wrapping_journal_keeps_head_and_replay_right(tmp_path: Path) -> None:
    image = make_image(tmp_path / "fs.img")
    dev = await open_device(image)
    latest: dict[int, bytes] = {}
    try:
        root, root_img = await root_dinode(dev)
        pool = await free_blocks(dev, GROUPS * BLOCKS_PER_TXN, spacing=1)
        files, extents = await journal0(dev)
        journal = await open_journal(dev, 0)
        size = journal.journal_blocks
        first_sequence = journal.next_sequence
        laps = 0
        previous_head = journal.head_block
        txn_no = 0

        async def commit_one() -> None:
            nonlocal txn_no
            txn_no += 1
            t = Transaction(BSIZE)
            image_ = touched_root(root_img, 0o700 | (txn_no % 64), txn_no)
            t.add_metadata(root, image_)
            latest[root] = image_
            start = (txn_no % GROUPS) * BLOCKS_PER_TXN
            for blk in pool[start : start + BLOCKS_PER_TXN]:
                latest[blk] = metadata_block(blk, txn_no)
                t.add_metadata(blk, latest[blk])
            await journal.commit(t)

        while laps < LAPS:
            await commit_one()
            if journal.head_block < previous_head:
                laps += 1
            previous_head = journal.head_block
            if txn_no % 70 == 0:
                await journal.checkpoint()  # explicit, besides the forced ones
            elif txn_no % 9 == 0:
                await journal.write_back(list(journal.ail_blocks)[:10])
            if txn_no % 37 == 0:
                await assert_same_replay(image, tmp_path)
            if txn_no % 10 == 0:
                scan = await scan_journal(dev, list(extents.runs), BSIZE)
                assert scan.head is not None and not scan.clean
                assert scan.head.sequence == journal.next_sequence - 1
                assert scan.head.position == (journal.head_block - 1) % size
                assert not scan.duplicate_sequences
                assert scan.out_of_order == 0

        # Leave a dirty log that crosses the end of the ring.
        txn_size = BLOCKS_PER_TXN + 3
        while journal.head_block < size - txn_size or journal.head_block >= size - 2:
            await commit_one()
        await journal.checkpoint()
        dirty_from = journal.head_block
        for _ in range(3):
            await commit_one()
        assert journal.head_block < dirty_from, "the dirty part must wrap"
        assert journal.forced_checkpoints >= 2, "a full log must force checkpoints"
        total_sequences = journal.next_sequence - first_sequence
        assert total_sequences * txn_size > LAPS * size
    finally:
        await dev.aclose()

    check = fsck(image, "-n")
    assert check.dirty, check.output
    by_fsck = tmp_path / "by-fsck.img"
    shutil.copyfile(image, by_fsck)
    run = fsck(by_fsck, "-y")
    meta, _ = replay_counts(run.output)
    assert meta == (3 * (BLOCKS_PER_TXN + 1), 3 * (BLOCKS_PER_TXN + 1))
    for blk, img in latest.items():
        assert read_block(by_fsck, blk) == img, f"block {blk}"

    dev = await open_device(image)
    try:
        _, extents = await journal0(dev)
        result = await replay_journal(dev, extents, jid=0, header_style="fsck")
        assert result.metadata_replayed == meta[0]
    finally:
        await dev.aclose()
    assert image.read_bytes() == by_fsck.read_bytes()
    assert_fsck_silent(image, tmp_path)
