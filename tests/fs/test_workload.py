"""A mixed workload driven straight at FileSystem, then both fsck tools as oracles."""

from __future__ import annotations

import errno
import os
import shutil
import stat

import pytest

from gfspy.fs.api import FsError, SetAttr

from .helpers import (
    assert_clean,
    fsck_gfs2,
    list_dir,
    make_image,
    mounted,
    read_all,
    write_file,
)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("tool", "entries"), [("gfspy", 5000), ("mkfs.gfs2", 1500)])
async def test_mixed_workload_passes_both_fscks(tmp_path, tool, entries):
    img = make_image(tmp_path / "fs.img", tool=tool, size_mib=256)
    payload = os.urandom(3 * 1024 * 1024 + 123)
    async with mounted(img) as fs:
        root = fs.root_ino
        small = await write_file(fs, root, b"small", b"hello world")
        big = await write_file(fs, root, b"big", payload)
        sparse = await write_file(fs, root, b"sparse", b"head")
        await fs.write(sparse, 3 << 30, b"tail at 3 GiB")  # height 3 tree, mostly holes
        sub = (await fs.mkdir(root, b"sub", 0o755, 1000, 1000)).ino
        many = (await fs.mkdir(root, b"many", 0o700, 0, 0)).ino
        for i in range(entries):
            await fs.create(many, b"entry-%05d" % i, 0o100600, 0, 0)
        await fs.link(small, sub, b"small-link")
        await fs.symlink(sub, b"to-big", b"../big", 0, 0)
        await fs.create(sub, b"fifo", stat.S_IFIFO | 0o644, 0, 0)
        await fs.create(sub, b"chr", stat.S_IFCHR | 0o600, 0, 0, rdev=os.makedev(1, 3))
        await fs.setxattr(small, b"user.inline", b"x" * 100, 0)
        await fs.setxattr(small, b"user.unstuffed", b"y" * 20000, 0)
        await fs.setxattr(small, b"trusted.t", b"z", 0)
        await fs.rename(root, b"big", sub, b"big-moved")
        await fs.rename(root, b"sparse", root, b"sparse2")
        for i in range(0, entries, 3):
            await fs.unlink(many, b"entry-%05d" % i)
        await fs.setattr(big, SetAttr(size=1000000))
        assert await fs.readlink((await fs.lookup(sub, b"to-big")).ino) == b"../big"

    async with mounted(img) as fs:
        root = fs.root_ino
        sub = (await fs.lookup(root, b"sub")).ino
        big = (await fs.lookup(sub, b"big-moved")).ino
        assert await read_all(fs, big) == payload[:1000000]
        small = await fs.lookup(sub, b"small-link")
        assert small.nlink == 2
        assert await read_all(fs, small.ino) == b"hello world"
        assert await fs.getxattr(small.ino, b"user.unstuffed") == b"y" * 20000
        assert sorted(await fs.listxattr(small.ino)) == [
            b"trusted.t",
            b"user.inline",
            b"user.unstuffed",
        ]
        sparse = (await fs.lookup(root, b"sparse2")).ino
        assert await fs.read(sparse, 0, 4) == b"head"
        assert await fs.read(sparse, 1 << 30, 8) == bytes(8)
        assert await fs.read(sparse, 3 << 30, 100) == b"tail at 3 GiB"
        names = await list_dir(fs, (await fs.lookup(root, b"many")).ino)
        expected = {b"entry-%05d" % i for i in range(entries) if i % 3}
        assert sorted(names) == sorted(expected | {b".", b".."})
        with pytest.raises(FsError) as e:
            await fs.lookup(root, b"big")
        assert e.value.errno == errno.ENOENT
    assert_clean(img)


@pytest.mark.timeout(60)
async def test_remove_everything_returns_every_block(tmp_path):
    img = make_image(tmp_path / "fs.img")
    async with mounted(img) as fs:
        before = await fs.statfs()
        root = fs.root_ino
        d = (await fs.mkdir(root, b"d", 0o755, 0, 0)).ino
        for i in range(400):
            ino = await write_file(fs, d, b"f%d" % i, os.urandom(i * 37))
            await fs.setxattr(ino, b"user.a", b"q" * (i * 20), 0)
        big = await write_file(fs, root, b"big", os.urandom(5 << 20))
        await fs.write(big, 1 << 32, b"x")
        during = await fs.statfs()
        assert during.bfree < before.bfree - 1280
        for i in range(400):
            await fs.unlink(d, b"f%d" % i)
        await fs.rmdir(root, b"d")
        await fs.unlink(root, b"big")
        after = await fs.statfs()
        assert (after.bfree, after.files) == (before.bfree, before.files)
    assert_clean(img)


@pytest.mark.timeout(60)
async def test_sync_leaves_everything_in_place(tmp_path):
    """After sync() the device alone (no journal replay) is a consistent filesystem
    with an exact master statfs: what a kill right after `sync` would leave."""
    img = make_image(tmp_path / "fs.img", size_mib=64)
    async with mounted(img, commit_interval=3600) as fs:
        d = (await fs.mkdir(fs.root_ino, b"d", 0o755, 0, 0)).ino
        for i in range(300):
            await write_file(fs, d, b"f%d" % i, os.urandom(i * 100))
        for i in range(0, 300, 2):
            await fs.unlink(d, b"f%d" % i)
        await fs.sync()
        copy = tmp_path / "synced.img"
        shutil.copyfile(img, copy)
    rc, complaints = fsck_gfs2(copy, "-n")
    # The log was checkpointed but not closed: fsck notes the open journal and
    # has nothing else to say (it checks the un-replayed filesystem).
    assert rc == 0
    allowed = ("is dirty", "not replaying due to the -n option", "Journal recovery complete")
    assert any("is dirty" in line for line in complaints), complaints
    assert all(any(a in line for a in allowed) for line in complaints), complaints
