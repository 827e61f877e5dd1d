"""Operations from many trio tasks at once, as the FUSE layer issues them: the
result must be as consistent as if they had run one after another."""

from __future__ import annotations

import os
import random

import pytest
import trio

from gfspy.fs.api import SetAttr

from .helpers import assert_clean, list_dir, make_image, mounted, read_all


@pytest.mark.timeout(90)
async def test_concurrent_tasks_leave_a_consistent_image(tmp_path):
    img = make_image(tmp_path / "fs.img")
    results: dict[bytes, bytes] = {}
    async with mounted(img, commit_interval=0.2) as fs:
        root = fs.root_ino
        shared = (await fs.mkdir(root, b"shared", 0o755, 0, 0)).ino

        async def worker(n: int) -> None:
            rng = random.Random(n)
            own = (await fs.mkdir(root, b"w%d" % n, 0o755, 0, 0)).ino
            for i in range(150):
                name = b"w%d-%d" % (n, i)
                data = rng.randbytes(rng.choice([10, 5000, 70000]))
                attr = await fs.create(shared if i % 2 else own, name, 0o100644, 0, 0)
                await fs.write(attr.ino, 0, data)
                if i % 5 == 0:
                    await fs.rename(shared if i % 2 else own, name, root, name)
                    results[name] = data
                elif i % 7 == 0:
                    await fs.unlink(shared if i % 2 else own, name)
                else:
                    results[name] = data
                if i % 25 == 0:
                    await fs.fsync(attr.ino, False)
                await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            for n in range(6):
                nursery.start_soon(worker, n)
        periodic_flushes = fs.journal.commits
        assert periodic_flushes > 0
    async with mounted(img) as fs:
        found = {}
        for parent_name in [None, b"shared", *(b"w%d" % n for n in range(6))]:
            parent = (
                fs.root_ino
                if parent_name is None
                else (await fs.lookup(fs.root_ino, parent_name)).ino
            )
            for name in await list_dir(fs, parent):
                if name.startswith(b"w") and b"-" in name:
                    found[name] = await read_all(fs, (await fs.lookup(parent, name)).ino)
        assert found == results
    assert_clean(img)


@pytest.mark.timeout(30)
async def test_cancelled_operation_does_not_leave_half_a_change(tmp_path):
    img = make_image(tmp_path / "fs.img", size_mib=64)
    async with mounted(img) as fs:
        root = fs.root_ino
        with trio.move_on_after(0):  # cancelled at its first checkpoint
            await fs.create(root, b"maybe", 0o100644, 0, 0)
        ino = (await fs.create(root, b"big", 0o100644, 0, 0)).ino
        with trio.CancelScope() as scope:
            scope.cancel()
            await fs.write(ino, 0, os.urandom(3 << 20))
        await fs.mkdir(root, b"after", 0o755, 0, 0)
    assert_clean(img)


@pytest.mark.timeout(30)
async def test_periodic_flush_commits_and_stops_at_close(tmp_path):
    img = make_image(tmp_path / "fs.img", size_mib=64)
    async with trio.open_nursery() as nursery, mounted(img, commit_interval=0.5) as fs:
        nursery.start_soon(fs.run_periodic_flush)
        d = (await fs.mkdir(fs.root_ino, b"d", 0o755, 0, 0)).ino
        await fs.setattr(d, SetAttr(mode=0o700))
        with trio.fail_after(10):  # no fsync and no further operation: the timer commits
            while fs.journal.pending_image(d) is not None:
                await trio.sleep(0.01)
        # Leaving the block closes the fs, which wakes the task so the nursery exits.
    assert_clean(img)
