"""Crash consistency: cut the power at every interesting instant of a commit, its
write-back and the clean unmount, replay each crashed image, and require that the
filesystem holds either the whole old state or the whole new one.

How crashes are simulated: the journal runs over a real LocalDevice wrapped by
`RecordingDevice` (helpers.py), which logs every write and flush. A crash image is rebuilt from the
pristine image by applying the writes made durable by the last flush plus a subset of
the block writes issued after it (a disk may complete those in any order, and tear a
multi-block write): every prefix, and the "reordered" subsets (only the last block;
all but the first). This models a
volatile write cache honestly; nothing about the journal itself is faked.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gfspy.blockdev.local import LocalDevice
from gfspy.journal.log import open_journal
from gfspy.journal.replay import replay_journal
from gfspy.journal.transaction import Transaction

from .helpers import (
    BSIZE,
    RecordingDevice,
    assert_fsck_silent,
    build_image,
    crash_states,
    data_block,
    free_blocks,
    fsck,
    journal0,
    make_image,
    metadata_block,
    open_device,
    read_block,
    root_dinode,
    touched_root,
)


@pytest.mark.timeout(120)
async def test_crash_at_every_point_gives_old_or_new_state(tmp_path: Path) -> None:
    image = make_image(tmp_path / "fs.img")
    dev = await open_device(image)
    try:
        root, root_img = await root_dinode(dev)
        blocks = await free_blocks(dev, 5, spacing=3)
        meta_blocks, jdata_block, ordered_block = blocks[:3], blocks[3], blocks[4]
        journal = await open_journal(dev, 0)
        # Go round the ring once with transactions shaped like the one under test, so
        # the log blocks it overwrites hold stale descriptors and copies, not mkfs's
        # headers: a header landing without its body would then replay garbage.
        ancient = 1000
        while journal.commits * 9 < 2 * journal.journal_blocks:
            ancient += 1
            t = Transaction(BSIZE)
            t.add_metadata(root, touched_root(root_img, 0o700, ancient))
            t.add_jdata(jdata_block, data_block(ancient))
            for blk in meta_blocks:
                t.add_metadata(blk, metadata_block(blk, ancient))
            await journal.commit(t)
        # The "old" state: one more transaction, then a clean unmount.
        t0 = Transaction(BSIZE)
        t0.add_metadata(root, touched_root(root_img, 0o711, 111))
        t0.add_jdata(jdata_block, data_block(0))
        for blk in meta_blocks:
            t0.add_metadata(blk, metadata_block(blk, 0))
        await journal.commit(t0)
        await journal.clean_unmount()
        await dev.aclose()
    except BaseException:
        await dev.aclose()
        raise
    base = tmp_path / "base.img"
    shutil.copyfile(image, base)
    old = {blk: read_block(base, blk) for blk in [root, *meta_blocks, jdata_block]}
    new = {
        root: touched_root(root_img, 0o755, 222),
        jdata_block: data_block(5, starts_with_magic=True),
    }
    new.update({blk: metadata_block(blk, 1) for blk in meta_blocks})
    ordered_data = data_block(99)

    recorder = RecordingDevice(await LocalDevice.open(str(image)))
    try:
        journal = await open_journal(recorder, 0)
        t1 = Transaction(BSIZE)
        for blk, img in new.items():
            if blk == jdata_block:
                t1.add_jdata(blk, img)
            else:
                t1.add_metadata(blk, img)

        async def write_ordered_data() -> None:
            await recorder.write(ordered_block * BSIZE, ordered_data)

        await journal.commit(t1, ordered=write_ordered_data)
        await journal.write_back([meta_blocks[0]])
        await journal.checkpoint()
        await journal.clean_unmount()
    finally:
        await recorder.aclose()

    states = crash_states(recorder.epochs)
    assert len(states) > 15
    seen = {"old": 0, "new": 0}
    for index, (label, writes) in enumerate(states):
        crashed = build_image(base, writes, tmp_path / f"crash{index}.img")
        dev = await open_device(crashed)
        try:
            _, extents = await journal0(dev)
            await replay_journal(dev, extents, jid=0)
        finally:
            await dev.aclose()
        now = {blk: read_block(crashed, blk) for blk in old}
        if now == old:
            seen["old"] += 1
        else:
            assert now == new, f"{label}: a mix of old and new blocks after replay"
            seen["new"] += 1
            assert read_block(crashed, ordered_block) == ordered_data, (
                f"{label}: committed without its ordered data"
            )
        assert_fsck_silent(crashed, tmp_path)  # clean journal, nothing to complain of
        crashed.unlink()
    assert seen["old"] and seen["new"], seen


@pytest.mark.timeout(60)
async def test_fsck_replay_of_crash_after_header_matches_ours(tmp_path: Path) -> None:
    """The state right after the commit header (nothing in place) replayed by both."""
    image = make_image(tmp_path / "fs.img")
    recorder = RecordingDevice(await LocalDevice.open(str(image)))
    try:
        root, root_img = await root_dinode(recorder)
        blocks = await free_blocks(recorder, 2, spacing=3)
        base = tmp_path / "base.img"
        shutil.copyfile(image, base)
        recorder.epochs = [[]]
        journal = await open_journal(recorder, 0)
        t = Transaction(BSIZE)
        t.add_metadata(root, touched_root(root_img, 0o700, 5))
        t.add_metadata(blocks[0], metadata_block(blocks[0], 9))
        t.add_jdata(blocks[1], data_block(3))
        await journal.commit(t)
        await journal.clean_unmount()
    finally:
        await recorder.aclose()
    # Epochs: [body], [header], [in-place writes], [unmount header], [].
    after_header = [w for epoch in recorder.epochs[:2] for w in epoch]
    ours = build_image(base, after_header, tmp_path / "ours.img")
    theirs = build_image(base, after_header, tmp_path / "theirs.img")
    assert fsck(theirs, "-y").returncode in (0, 1)
    dev = await open_device(ours)
    try:
        _, extents = await journal0(dev)
        result = await replay_journal(dev, extents, jid=0, header_style="fsck")
        assert (result.metadata_replayed, result.jdata_replayed) == (2, 1)
    finally:
        await dev.aclose()
    assert ours.read_bytes() == theirs.read_bytes()
    assert read_block(ours, blocks[0]) == metadata_block(blocks[0], 9)
