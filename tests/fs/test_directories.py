"""Directories: growth from stuffed to exhash, leaf splits, table doubling to the
maximum depth and leaf chains after it, name limits and stable readdir cookies."""

from __future__ import annotations

import errno
import os
import zlib

import pytest

from gfspy.fs.api import FsError

from .helpers import assert_clean, list_dir, make_image, mounted


def _colliding_names(count: int, length: int = 255) -> list[bytes]:
    """`count` names whose hashes share their top 17 bits: a leaf at the maximum
    table depth (17) cannot be split any further, so they force a leaf chain."""
    prefix = os.urandom(length // 2).hex().encode()[: length - 12]
    seed = zlib.crc32(prefix)
    buckets: dict[int, list[bytes]] = {}
    i = 0
    while True:
        suffix = b"%012d" % i
        top = zlib.crc32(suffix, seed) >> 15
        names = buckets.setdefault(top, [])
        names.append(prefix + suffix)
        if len(names) == count:
            return names
        i += 1


@pytest.mark.timeout(120)
async def test_table_doubles_to_max_depth_then_chains(tmp_path):
    img = make_image(tmp_path / "fs.img")
    names = _colliding_names(16)
    async with mounted(img) as fs:
        d = (await fs.mkdir(fs.root_ino, b"d", 0o755, 0, 0)).ino
        for name in names:
            await fs.create(d, name, 0o100644, 0, 0)
        ip = fs.inodes[d]
        assert ip.di.depth == 17  # doubled from 8 all the way
        assert ip.di.height >= 1  # the 1 MiB hash table lives in JD blocks
        assert (await fs.getattr(d)).size == 8 << 17
        assert sorted(await list_dir(fs, d)) == sorted([b".", b"..", *names])
        for name in names[::2]:
            await fs.unlink(d, name)
        for name in names[1::2]:
            assert (await fs.lookup(d, name)).nlink == 1
    assert_clean(img)


@pytest.mark.timeout(120)
async def test_long_names_grow_an_unstuffed_table(tmp_path):
    img = make_image(tmp_path / "fs.img")
    names = [b"%04d-" % i + b"n" * 250 for i in range(3000)]
    async with mounted(img) as fs:
        d = (await fs.mkdir(fs.root_ino, b"d", 0o755, 0, 0)).ino
        for name in names:
            await fs.create(d, name, 0o100644, 0, 0)
        assert fs.inodes[d].di.depth > 8 and fs.inodes[d].di.height >= 1
        with pytest.raises(FsError) as info:
            await fs.create(d, b"x" * 256, 0o100644, 0, 0)
        assert info.value.errno == errno.ENAMETOOLONG
        with pytest.raises(FsError) as info:
            await fs.create(d, names[7], 0o100644, 0, 0)
        assert info.value.errno == errno.EEXIST
        for name in names[:2000]:
            await fs.unlink(d, name)
    async with mounted(img) as fs:
        d = (await fs.lookup(fs.root_ino, b"d")).ino
        assert sorted(await list_dir(fs, d)) == sorted([b".", b"..", *names[2000:]])
        for name in names[2000:]:
            await fs.unlink(d, name)
        await fs.rmdir(fs.root_ino, b"d")
    assert_clean(img)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bsize", [4096, 512])
async def test_readdir_cookies_survive_changes(tmp_path, bsize):
    img = make_image(tmp_path / "fs.img", bsize=bsize)
    async with mounted(img) as fs:
        d = (await fs.mkdir(fs.root_ino, b"d", 0o755, 0, 0)).ino
        names = [b"e%d" % i for i in range(3000)]
        for name in names:
            await fs.create(d, name, 0o100644, 0, 0)
        seen: list[bytes] = []
        removed: set[bytes] = set()
        cookie = 0
        step = 0
        while True:
            batch = await fs.readdir(d, cookie)
            if not batch:
                break
            seen.extend(name for name, _, _ in batch)
            cookie = batch[-1][2]
            # Change the directory between batches: remove entries not seen yet and
            # add new ones (their hashes fall anywhere).
            seen_set = set(seen)
            unseen = [n for n in names if n not in removed and n not in seen_set]
            for name in unseen[:40]:
                await fs.unlink(d, name)
                removed.add(name)
            for k in range(40):
                await fs.create(d, b"new%d-%d" % (step, k), 0o100644, 0, 0)
            step += 1
        assert len(seen) == len(set(seen)), "an entry was returned twice"
        stayed = set(names) - removed
        assert stayed <= set(seen), "an entry present throughout was skipped"
        assert not removed & set(seen)
    assert_clean(img)


@pytest.mark.timeout(30)
async def test_small_directory_stays_linear_and_readdir_sees_all(tmp_path):
    img = make_image(tmp_path / "fs.img", size_mib=64)
    async with mounted(img) as fs:
        d = (await fs.mkdir(fs.root_ino, b"d", 0o755, 0, 0)).ino
        for i in range(20):
            await fs.mkdir(d, b"sub%d" % i, 0o755, 0, 0)
        assert fs.inodes[d].di.depth == 0 and (await fs.getattr(d)).nlink == 22
        entries = await fs.readdir(d, 0)
        assert len(entries) == 22
        cookies = [c for _, _, c in entries]
        assert cookies == sorted(cookies) and len(set(cookies)) == 22
        with pytest.raises(FsError) as info:
            await fs.rmdir(fs.root_ino, b"d")
        assert info.value.errno == errno.ENOTEMPTY
    assert_clean(img)
