"""A journal whose blocks are not in device order: the writer and replay must follow
the dinode's metadata tree, and fsck.gfs2 (which also follows it) must agree."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from gfspy.journal.extent import map_journal
from gfspy.journal.log import open_journal
from gfspy.journal.replay import replay_journal
from gfspy.journal.reset import reset_journal
from gfspy.journal.transaction import Transaction
from gfspy.ondisk.constants import DINODE_SIZE

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
)


@pytest.mark.timeout(90)
async def test_journal_with_permuted_blocks(tmp_path: Path) -> None:
    image = make_image(tmp_path / "fs.img")
    dev = await open_device(image)
    latest: dict[int, bytes] = {}
    try:
        files, extents = await journal0(dev)
        assert len(extents.runs) == 1, "mkfs.gfs2 lays journals out contiguously"
        # Swap the dinode's first and third pointers to IN blocks: journal blocks
        # 0..508 and 1018..1526 trade places on the device.
        raw = bytearray(await dev.read(files.journal * BSIZE, BSIZE))
        first, third = (
            struct.unpack_from(">Q", raw, DINODE_SIZE)[0],
            struct.unpack_from(">Q", raw, DINODE_SIZE + 16)[0],
        )
        struct.pack_into(">Q", raw, DINODE_SIZE, third)
        struct.pack_into(">Q", raw, DINODE_SIZE + 16, first)
        await dev.write(files.journal * BSIZE, bytes(raw))
        permuted = await map_journal(dev, BSIZE, files.journal)
        assert permuted.blocks == extents.blocks
        assert len(permuted.runs) == 4
        assert permuted.device_block(0) == extents.device_block(1018)
        await reset_journal(dev, permuted, jid=0)
        await dev.flush()
    finally:
        await dev.aclose()
    assert_fsck_silent(image, tmp_path)

    dev = await open_device(image)
    try:
        pool = await free_blocks(dev, 60 * 40, spacing=1)
        journal = await open_journal(dev, 0)
        assert journal.extents.runs == permuted.runs
        n = 0
        while journal.commits * 42 < 1.6 * journal.journal_blocks or journal.commits % 7:
            n += 1
            t = Transaction(BSIZE)
            group = pool[(n % 60) * 40 : (n % 60 + 1) * 40]
            for blk in group:
                latest[blk] = metadata_block(blk, n)
                t.add_metadata(blk, latest[blk])
            await journal.commit(t)
        assert journal.forced_checkpoints >= 1
        dirty = journal.ail_blocks
        assert dirty
    finally:
        await dev.aclose()

    by_fsck = tmp_path / "by-fsck.img"
    shutil.copyfile(image, by_fsck)
    run = fsck(by_fsck, "-y")
    meta, _ = replay_counts(run.output)
    assert meta[0] == meta[1] >= len(dirty)
    for blk, img in latest.items():
        assert read_block(by_fsck, blk) == img, f"block {blk}"

    dev = await open_device(image)
    try:
        _, extents = await journal0(dev)
        await replay_journal(dev, extents, jid=0, header_style="fsck")
    finally:
        await dev.aclose()
    assert image.read_bytes() == by_fsck.read_bytes()
