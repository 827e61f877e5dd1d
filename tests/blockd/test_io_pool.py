"""The thread plumbing under the server: worker pool, shared counters, writev bookkeeping."""

from __future__ import annotations

import threading

import pytest
import trio

from gfspy.blockd.io_pool import IOPool, SharedCounter
from gfspy.blockd.reply_writer import _advance


@pytest.mark.timeout(30)
async def test_pool_runs_jobs_in_threads_and_survives_a_failing_job():
    pool = IOPool(threads=3)
    done = SharedCounter()
    names: set[str] = set()

    def job() -> None:
        names.add(threading.current_thread().name)
        done.add()

    def broken() -> None:
        raise RuntimeError("a bug in a job")

    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        pool.submit(broken)
        for _ in range(50):
            pool.submit(job)
        with trio.fail_after(10):
            while done.value < 50:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()  # the threads finish and exit
    assert threading.current_thread().name not in names


@pytest.mark.timeout(30)
async def test_counter_wakes_trio_waiters_from_other_threads():
    counter = SharedCounter()
    counter.add(5)
    woke = []

    async def waiter(limit: int) -> None:
        await counter.wait_at_most(limit)
        woke.append(limit)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter, 3)
        nursery.start_soon(waiter, 0)
        await trio.sleep(0.05)
        assert woke == []
        await trio.to_thread.run_sync(counter.sub, 2)
        await trio.sleep(0.05)
        assert woke == [3]
        for _ in range(3):
            await trio.to_thread.run_sync(counter.sub)
    assert woke == [3, 0] and counter.value == 0
    with trio.fail_after(1):
        await counter.wait_at_most(0)  # already there: no waiting


@pytest.mark.timeout(10)
def test_advance_drops_sent_bytes_across_parts():
    parts = [memoryview(b"abcd"), memoryview(b"ef"), memoryview(b"ghij")]
    assert [bytes(p) for p in _advance(parts, 0)] == [b"abcd", b"ef", b"ghij"]
    assert [bytes(p) for p in _advance(parts, 3)] == [b"d", b"ef", b"ghij"]
    assert [bytes(p) for p in _advance(parts, 6)] == [b"ghij"]
    assert [bytes(p) for p in _advance(parts, 7)] == [b"hij"]
    assert _advance(parts, 10) == []
