"""The glock state machine with the nolock module: grants, shared and exclusive
holders, and demotion running go_sync before and go_inval after."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from gfspy.glock import (
    LM_ST_EXCLUSIVE,
    LM_ST_SHARED,
    LM_ST_UNLOCKED,
    GlockOps,
    GlockTable,
    NoLock,
)
from gfspy.glock.glock import LM_TYPE_INODE
from gfspy.ondisk.dinode import Dinode

from .helpers import assert_clean, make_image, mounted, write_file


def _table(events: list[str]) -> GlockTable:
    async def go_sync(gl):
        events.append(f"sync {gl.number}")

    async def go_inval(gl):
        events.append(f"inval {gl.number}")

    return GlockTable(NoLock(), {LM_TYPE_INODE: GlockOps("inode", go_sync, go_inval)})


@pytest.mark.timeout(10)
async def test_state_is_cached_after_holders_leave():
    events: list[str] = []
    table = _table(events)
    async with table.hold(LM_TYPE_INODE, 7, LM_ST_EXCLUSIVE):
        pass
    glock = table.get(LM_TYPE_INODE, 7)
    assert glock.state == LM_ST_EXCLUSIVE and not glock.holders
    requests = table.module.requests
    async with table.hold(LM_TYPE_INODE, 7, LM_ST_SHARED):  # EX already covers SH
        pass
    assert table.module.requests == requests
    await glock.demote(LM_ST_UNLOCKED)
    assert events == ["sync 7", "inval 7"] and glock.state == LM_ST_UNLOCKED
    await table.aclose()


@pytest.mark.timeout(10)
async def test_exclusive_waits_for_shared_holders():
    table = _table([])
    order: list[str] = []
    glock = table.get(LM_TYPE_INODE, 1)
    shared = await glock.acquire(LM_ST_SHARED)
    other = await glock.acquire(LM_ST_SHARED)  # shared holders coexist

    async def writer():
        holder = await glock.acquire(LM_ST_EXCLUSIVE)
        order.append("writer")
        glock.release(holder)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        order.append("readers done")
        glock.release(shared)
        glock.release(other)
    assert order == ["readers done", "writer"]
    assert glock.state == LM_ST_EXCLUSIVE


@pytest.mark.timeout(10)
async def test_demote_waits_for_holder_and_blocking_callback_queues():
    events: list[str] = []
    table = _table(events)
    glock = table.get(LM_TYPE_INODE, 3)
    holder = await glock.acquire(LM_ST_EXCLUSIVE)
    table.blocking_callback(LM_TYPE_INODE, 3, LM_ST_SHARED)  # what a DLM would send

    async with trio.open_nursery() as nursery:
        nursery.start_soon(table.run_demotes)
        await trio.testing.wait_all_tasks_blocked()
        assert events == []  # still held: the demotion waits
        glock.release(holder)
    assert events == ["sync 3", "inval 3"] and glock.state == LM_ST_SHARED


@pytest.mark.timeout(30)
async def test_demoting_an_inode_glock_syncs_and_invalidates(tmp_path):
    """What another node's request does to a mounted fs: the inode's metadata is
    written in place (readable straight from the device, no replay needed), the
    FUSE layer is told to drop its cache, and the next operation relocks."""
    img = make_image(tmp_path / "fs.img", size_mib=64)
    invalidated: list[int] = []
    async with mounted(img, commit_interval=3600) as fs:
        fs.invalidate_callback = invalidated.append
        ino = await write_file(fs, fs.root_ino, b"f", b"in place")
        glock = fs.glocks.get(LM_TYPE_INODE, ino)
        assert glock.state == LM_ST_EXCLUSIVE
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fs.serve_glock_demotes)
            fs.glocks.blocking_callback(LM_TYPE_INODE, ino, LM_ST_EXCLUSIVE)
            with trio.fail_after(10):
                while glock.state != LM_ST_UNLOCKED:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert invalidated == [ino]
        raw = img.read_bytes()[ino * 4096 : (ino + 1) * 4096]
        assert Dinode.unpack(raw).size == 8 and raw[232:240] == b"in place"
        await fs.write(ino, 8, b", again")
        assert await fs.read(ino, 0, 100) == b"in place, again"
        assert glock.state == LM_ST_EXCLUSIVE
    assert_clean(img)
