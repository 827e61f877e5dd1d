"""Smaller block sizes change every capacity in the log (items per descriptor, revokes
per continuation block, jdata pairs); fsck.gfs2 must replay what we write at each,
byte for byte as our replay does."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gfspy.journal.locate import read_superblock
from gfspy.journal.log import open_journal
from gfspy.journal.replay import recover_journal
from gfspy.journal.transaction import Transaction

from .helpers import (
    assert_fsck_silent,
    data_block,
    free_blocks,
    fsck,
    make_image,
    metadata_block,
    open_device,
    read_block,
    replay_counts,
)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("bsize", [512, 1024, 2048])
async def test_multi_descriptor_transactions_at_small_block_sizes(
    tmp_path: Path, bsize: int
) -> None:
    image = make_image(tmp_path / "fs.img", bsize=bsize)
    dev = await open_device(image)
    try:
        assert (await read_superblock(dev)).bsize == bsize
        pool = await free_blocks(dev, 400, spacing=1)
        meta, jdata = pool[:300], pool[300:]
        journal = await open_journal(dev, 0)
        t1 = Transaction(bsize)
        for blk in meta:
            t1.add_metadata(blk, metadata_block(blk, 1, bsize))
        for blk in jdata:
            t1.add_jdata(blk, data_block(blk, starts_with_magic=blk % 3 == 0, bsize=bsize))
        await journal.commit(t1)
        t2 = Transaction(bsize)
        for blk in meta[:170] + jdata[:30]:
            t2.revoke(blk)
        await journal.commit(t2)
    finally:
        await dev.aclose()
    by_fsck = tmp_path / "by-fsck.img"
    shutil.copyfile(image, by_fsck)
    run = fsck(by_fsck, "-y")
    assert replay_counts(run.output) == ((130, 300), (70, 100))
    for blk in meta[170:]:
        assert read_block(by_fsck, blk, bsize) == metadata_block(blk, 1, bsize)
    for blk in jdata[30:]:
        expected = data_block(blk, starts_with_magic=blk % 3 == 0, bsize=bsize)
        assert read_block(by_fsck, blk, bsize) == expected
    dev = await open_device(image)
    try:
        result = await recover_journal(dev, 0, header_style="fsck", fold_statfs=False)
        assert result.revokes == 200
    finally:
        await dev.aclose()
    assert image.read_bytes() == by_fsck.read_bytes()
    assert_fsck_silent(image, tmp_path)
