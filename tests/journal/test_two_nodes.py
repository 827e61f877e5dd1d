"""Two nodes, two journals, one block handed from one node to the other (the glock
contract), then both crash: whatever order the journals are replayed in, the block
must end up as the second node wrote it. This is what revokes are for."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gfspy.journal.log import open_journal
from gfspy.journal.replay import recover_journal
from gfspy.journal.transaction import Transaction

from .helpers import (
    BSIZE,
    assert_fsck_silent,
    free_blocks,
    fsck,
    make_image,
    metadata_block,
    open_device,
    read_block,
)


@pytest.mark.timeout(90)
async def test_block_handed_over_between_nodes_survives_any_replay_order(
    tmp_path: Path,
) -> None:
    image = make_image(tmp_path / "fs.img", size_mib=40, journals=2)
    node0 = await open_device(image)  # two handles: two nodes sharing the disk
    node1 = await open_device(image)
    try:
        x, z = await free_blocks(node0, 2)
        j0 = await open_journal(node0, 0)
        j1 = await open_journal(node1, 1)
        t = Transaction(BSIZE)
        t.add_metadata(x, metadata_block(x, 1))
        t.add_metadata(z, metadata_block(z, 1))  # keeps node 0's tail before x's copy
        await j0.commit(t)
        await j0.sync_blocks([x])  # node 0 demotes x's lock: write back + revoke
        assert z in j0.ail_blocks
        assert await node1.read(x * BSIZE, BSIZE) == metadata_block(x, 1)
        t = Transaction(BSIZE)  # node 1 takes the lock and changes x
        t.add_metadata(x, metadata_block(x, 2))
        await j1.commit(t)
    finally:
        await node0.aclose()  # both nodes crash
        await node1.aclose()

    by_fsck = tmp_path / "by-fsck.img"
    shutil.copyfile(image, by_fsck)
    assert fsck(by_fsck, "-y").returncode in (0, 1)
    assert read_block(by_fsck, x) == metadata_block(x, 2)
    assert read_block(by_fsck, z) == metadata_block(z, 1)

    for order in ((0, 1), (1, 0)):
        copy = tmp_path / f"order{order[0]}{order[1]}.img"
        shutil.copyfile(image, copy)
        dev = await open_device(copy)
        try:
            for jid in order:
                await recover_journal(dev, jid, recovery=True)
        finally:
            await dev.aclose()
        assert read_block(copy, x) == metadata_block(x, 2), f"replay order {order}"
        assert read_block(copy, z) == metadata_block(z, 1), f"replay order {order}"
        assert_fsck_silent(copy, tmp_path)
