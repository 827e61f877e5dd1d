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
    table._blocking_callback(LM_TYPE_INODE, 3, LM_ST_SHARED)  # what a DLM would send

    async with trio.open_nursery() as nursery:
        nursery.start_soon(table.run_demotes)
        await trio.testing.wait_all_tasks_blocked()
        assert events == []  # still held: the demotion waits
        glock.release(holder)
    assert events == ["sync 3", "inval 3"] and glock.state == LM_ST_SHARED
