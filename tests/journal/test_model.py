"""A seeded random workload checked against a model of what must survive a crash.

Commits (relogging, freeing and reusing blocks), partial write-backs and checkpoints
run for long enough to wrap the journal; at many points the image is copied as a
crash would leave it and replayed. Every block must then hold its last committed
image, and a block freed and reused for unjournaled data must keep that data (the
revoke rule). A few of the crash images are replayed by fsck.gfs2 -y too, which must
produce the same bytes as our replay.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from gfspy.journal.log import open_journal
from gfspy.journal.replay import replay_journal
from gfspy.journal.transaction import Transaction

from .helpers import (
    BSIZE,
    data_block,
    free_blocks,
    fsck,
    journal0,
    make_image,
    metadata_block,
    open_device,
    read_block,
)

STEPS = 400
CRASH_EVERY = 40
SEED = 20261125


async def check_crash_image(
    image: Path,
    tmp_path: Path,
    index: int,
    committed: dict[int, bytes],
    foreign: dict[int, bytes],
    with_fsck: bool,
) -> None:
    crashed = tmp_path / f"crash{index}.img"
    shutil.copyfile(image, crashed)
    if with_fsck:
        by_fsck = tmp_path / f"crash{index}-fsck.img"
        shutil.copyfile(crashed, by_fsck)
        assert fsck(by_fsck, "-y").returncode in (0, 1)
    dev = await open_device(crashed)
    try:
        _, extents = await journal0(dev)
        await replay_journal(dev, extents, jid=0, header_style="fsck")
    finally:
        await dev.aclose()
    for blk, img in committed.items():
        assert read_block(crashed, blk) == img, f"crash {index}: block {blk} lost its commit"
    for blk, img in foreign.items():
        assert read_block(crashed, blk) == img, f"crash {index}: reused block {blk} clobbered"
    if with_fsck:
        assert crashed.read_bytes() == by_fsck.read_bytes(), f"crash {index}"
        by_fsck.unlink()
    crashed.unlink()


@pytest.mark.timeout(120)
async def test_random_workload_survives_crashes(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    image = make_image(tmp_path / "fs.img")
    dev = await open_device(image)
    committed: dict[int, bytes] = {}
    foreign: dict[int, bytes] = {}
    crashes = 0
    try:
        pool = await free_blocks(dev, 60, spacing=1)
        journal = await open_journal(dev, 0)
        wraps = 0
        last_head = journal.head_block
        for step in range(1, STEPS + 1):
            roll = rng.random()
            if roll < 0.7:
                t = Transaction(BSIZE)
                freed = []
                for blk in rng.sample(pool, rng.randint(1, 12)):
                    if blk in committed and rng.random() < 0.2:
                        t.revoke(blk)
                        freed.append(blk)
                    else:
                        t.add_metadata(blk, metadata_block(blk, step))
                await journal.commit(t)
                for blk, img in t.metadata.items():
                    committed[blk] = img
                    foreign.pop(blk, None)
                for blk in freed:  # reused at once as unjournaled data
                    del committed[blk]
                    foreign[blk] = data_block(step)
                    await dev.write(blk * BSIZE, foreign[blk])
                await dev.flush()
            elif roll < 0.9:
                ail = sorted(journal.ail_blocks)
                await journal.write_back(rng.sample(ail, len(ail) // 2))
            else:
                await journal.checkpoint()
            if journal.head_block < last_head:
                wraps += 1
            last_head = journal.head_block
            if step % CRASH_EVERY == 0:
                crashes += 1
                await check_crash_image(
                    image, tmp_path, step, committed, foreign, with_fsck=crashes % 4 == 1
                )
        assert wraps >= 1
        await journal.clean_unmount()
    finally:
        await dev.aclose()
    for blk, img in committed.items():
        assert read_block(image, blk) == img
    for blk, img in foreign.items():
        assert read_block(image, blk) == img
