"""Freed metadata reused as file data must survive journal replay (issue 3).

A dinode, indirect block or directory leaf is logged, then freed and its block
handed to a file as (unjournaled) data. If the log still holds the old metadata copy
without a later revoke, replay after a crash writes that stale copy over the file's
fsync'd data. The crash is simulated by copying the image while still mounted.
"""

from __future__ import annotations

import errno
import os
import shutil

import pytest

from gfspy.fs.api import FsError
from gfspy.fs.types import SetAttr

from .helpers import assert_clean, fsck_gfs2, make_image, mounted, read_all, write_file


async def _replay_and_check(copy, expect: dict[bytes, bytes]) -> None:
    """Both fsck.gfs2's replay and gfspy's must keep every fsync'd file intact."""
    fsck_copy = copy.with_suffix(".fsck.img")
    shutil.copyfile(copy, fsck_copy)
    rc, _ = fsck_gfs2(fsck_copy, "-y")
    assert rc in (0, 1), rc
    async with mounted(fsck_copy) as fs:
        for name, data in expect.items():
            attr = await fs.lookup(fs.root_ino, name)
            assert await read_all(fs, attr.ino) == data, f"{name!r} damaged by fsck replay"
    async with mounted(copy) as fs:
        for name, data in expect.items():
            attr = await fs.lookup(fs.root_ino, name)
            assert await read_all(fs, attr.ino) == data, f"{name!r} damaged by gfspy replay"
    assert_clean(copy)


async def _free_dinodes(fs, root: int) -> list[int]:
    """Many small files (stuffed: their dinodes are logged), made durable, then
    unlinked, so their dinode blocks are freed while copies sit in the live log.
    The kernel may still send requests for such an inode (it keeps the number
    until it forgets it): they must get ESTALE or the inode's last attributes, and
    never revive the dead dinode from its stale image and log it again, which
    cancelled its revoke (issue 3)."""
    names = [b"victim%d" % i for i in range(40)]
    inos = [await write_file(fs, root, name, b"x" * 100) for name in names]
    await fs.fsync(fs.root_ino, False)
    for name in names:
        await fs.unlink(root, name)
    revived = []
    for ino in inos:
        try:
            assert (await fs.setattr(ino, SetAttr(mode=0o100600))).nlink == 0
        except FsError as e:
            assert e.errno == errno.ESTALE
        if ino in fs.inodes:
            revived.append(ino)
    return revived


async def _free_indirect(fs, root: int) -> list[int]:
    """A file deep enough to have indirect blocks, made durable, then truncated
    to nothing: its indirect blocks are freed."""
    ino = await write_file(fs, root, b"deep", os.urandom(4096 * 600))
    await fs.fsync(ino, False)
    await fs.setattr(ino, SetAttr(size=0))
    return []


async def _free_leaves(fs, root: int) -> list[int]:
    """A directory big enough to have leaf blocks, durable, then removed."""
    d = (await fs.mkdir(root, b"bigdir", 0o755, 0, 0)).ino
    names = [b"entry-with-a-long-name-%04d" % i for i in range(300)]
    for name in names:
        await fs.create(d, name, 0o100644, 0, 0)
    await fs.fsync(d, False)
    for name in names:
        await fs.unlink(d, name)
    await fs.rmdir(root, b"bigdir")
    return []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("free_step", [_free_dinodes, _free_indirect, _free_leaves])
@pytest.mark.parametrize("flush_between", [True, False], ids=["flushed", "same-flush"])
async def test_freed_metadata_reused_as_data_survives_replay(tmp_path, free_step, flush_between):
    img = make_image(tmp_path / "fs.img")
    expect: dict[bytes, bytes] = {}
    async with mounted(img, commit_interval=3600) as fs:
        root = fs.root_ino
        revived = await free_step(fs, root)
        if flush_between:
            await fs.fsync(root, False)
        # The freed blocks are the nearest free ones: this file's data reuses them.
        data = os.urandom(4096 * 700)
        ino = await write_file(fs, root, b"reuser", data)
        await fs.fsync(ino, False)
        expect[b"reuser"] = data
        copy = tmp_path / "crash.img"
        shutil.copyfile(img, copy)
    _, lines = fsck_gfs2(copy, "-n")
    assert any("dirty" in line for line in lines), lines
    await _replay_and_check(copy, expect)
    assert not revived, f"freed inodes {revived} came back to life"
