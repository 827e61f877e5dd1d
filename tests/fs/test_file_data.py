"""File contents against a reference model, fsx style: writes, truncates and holes
that move files between stuffed, height 1 and height 2 (and back), checked after
every step and again after a remount, with both checkers at the end."""

from __future__ import annotations

import errno
import random

import pytest

from gfspy.fs.api import FsError, SetAttr

from .helpers import assert_clean, make_image, mounted


@pytest.mark.timeout(120)
@pytest.mark.parametrize("bsize", [4096, 512])
async def test_random_io_matches_model(tmp_path, bsize):
    rng = random.Random(1802 + bsize)
    img = make_image(tmp_path / "fs.img", size_mib=128, bsize=bsize)
    stuffed = bsize - 232
    height1 = bsize * ((bsize - 232) // 8)  # largest file a height-1 tree addresses
    limit = height1 * 3 // 2  # crossing into height 2 (and 3 for 1 KiB blocks)
    files = 3
    models = [bytearray() for _ in range(files)]
    async with mounted(img) as fs:
        inos = [
            (await fs.create(fs.root_ino, b"f%d" % i, 0o100644, 0, 0)).ino for i in range(files)
        ]
        for step in range(700):
            k = rng.randrange(files)
            ino, model = inos[k], models[k]
            op = rng.random()
            if op < 0.55:
                where = rng.choice([rng.randrange(stuffed + 16), rng.randrange(limit)])
                length = rng.choice([1, 7, rng.randrange(1, 3 * bsize), rng.randrange(1, 70000)])
                data = rng.randbytes(length)
                assert await fs.write(ino, where, data) == length
                if len(model) < where:
                    model.extend(bytes(where - len(model)))
                model[where : where + length] = data
            elif op < 0.75:
                size = rng.choice([0, rng.randrange(stuffed + 8), rng.randrange(limit)])
                await fs.setattr(ino, SetAttr(size=size))
                if size < len(model):
                    del model[size:]
                else:
                    model.extend(bytes(size - len(model)))
            else:
                where = rng.randrange(len(model) + 10)
                length = rng.randrange(1, 3 * bsize)
                got = await fs.read(ino, where, length)
                assert got == bytes(model[where : where + length]), f"step {step}"
            attr = await fs.getattr(ino)
            assert attr.size == len(model), f"step {step}"
        for ino, model in zip(inos, models, strict=True):
            assert await fs.read(ino, 0, len(model) + 1) == bytes(model)
    async with mounted(img) as fs:
        for i, model in enumerate(models):
            ino = (await fs.lookup(fs.root_ino, b"f%d" % i)).ino
            assert await fs.read(ino, 0, len(model) + 1) == bytes(model)
    assert_clean(img)


@pytest.mark.timeout(60)
async def test_full_filesystem_gives_enospc_and_stays_consistent(tmp_path):
    img = make_image(tmp_path / "fs.img", size_mib=48)
    async with mounted(img) as fs:
        root = fs.root_ino
        chunk = bytes(range(256)) * 4096  # 1 MiB
        ino = (await fs.create(root, b"filler", 0o100644, 0, 0)).ino
        offset = 0
        with pytest.raises(FsError) as info:
            while True:
                await fs.write(ino, offset, chunk)
                offset += len(chunk)
        assert info.value.errno == errno.ENOSPC
        assert offset > 20 << 20
        assert await fs.read(ino, offset - 10, 10) == chunk[-10:]
        await fs.unlink(root, b"filler")
        small = (await fs.create(root, b"after", 0o100644, 0, 0)).ino
        await fs.write(small, 0, chunk)
    assert_clean(img)


@pytest.mark.timeout(60)
async def test_maximum_height_and_efbig(tmp_path):
    img = make_image(tmp_path / "fs.img", size_mib=64)
    async with mounted(img) as fs:
        ino = (await fs.create(fs.root_ino, b"huge", 0o100644, 0, 0)).ino
        far = fs.geo.heightsize[fs.geo.max_height - 1] + 12345
        await fs.write(ino, far, b"far away")
        assert fs.inodes[ino].di.height == fs.geo.max_height
        assert await fs.read(ino, far - 4, 12) == bytes(4) + b"far away"
        with pytest.raises(FsError) as info:
            await fs.write(ino, (1 << 63) - 2, b"xyz")
        assert info.value.errno == errno.EFBIG
        await fs.setattr(ino, SetAttr(size=10))
        assert await fs.read(ino, 0, 100) == bytes(10)
    assert_clean(img)


@pytest.mark.timeout(60)
async def test_big_file_is_freed_in_slices(tmp_path):
    """A file too big to free in one transaction goes in slices; the slice is made
    tiny here so that a few megabytes exercise the path."""
    img = make_image(tmp_path / "fs.img", size_mib=64)
    async with mounted(img) as fs:
        root = fs.root_ino
        before = await fs.statfs()
        fs.free_slice_blocks = 100
        ino = (await fs.create(root, b"big", 0o100644, 0, 0)).ino
        for i in range(6):
            await fs.write(ino, i << 20, bytes([i]) * (1 << 20))
        await fs.write(ino, 40 << 20, b"sparse tail")
        await fs.setattr(ino, SetAttr(size=(3 << 20) + 5))  # a truncate, also sliced
        assert await fs.read(ino, (3 << 20) - 2, 100) == bytes([2, 2, 3, 3, 3, 3, 3])
        assert (await fs.getattr(ino)).blocks * 512 < (3 << 20) + 64 * 4096
        await fs.unlink(root, b"big")
        await fs.fsync(root, False)
        assert (await fs.statfs()).bfree == before.bfree
        # Until the kernel forgets it, a freed inode answers with its last attributes.
        assert (await fs.getattr(ino)).nlink == 0
        await fs.forget(ino)
        with pytest.raises(FsError) as info:
            await fs.getattr(ino)
        assert info.value.errno == errno.ESTALE
    assert_clean(img)


@pytest.mark.timeout(60)
async def test_read_is_redone_under_the_lock_when_freed_blocks_may_have_been_reused(tmp_path):
    """Reads fetch data without the mount lock; one during which a log flush let freed
    blocks be handed out again must not return what those blocks hold now."""
    img = make_image(tmp_path / "fs.img", size_mib=64)
    async with mounted(img) as fs:
        payload = bytes(range(256)) * 64
        ino = (await fs.create(fs.root_ino, b"f", 0o100644, 0, 0)).ino
        await fs.write(ino, 0, payload)
        fetches = []
        real_fetch = fs.files.fetch

        async def fetch_during_a_flush(plan):
            fetches.append(plan)
            if len(fetches) == 1:
                fs.alloc.release_freed()  # as a concurrent flush would
            return await real_fetch(plan)

        fs.files.fetch = fetch_during_a_flush
        assert await fs.read(ino, 0, len(payload)) == payload
        assert len(fetches) == 2  # the unlocked fetch, then the locked re-read
        fetches.clear()
        assert await fs.read(ino, 100, 1000) == payload[100:1100]
        assert len(fetches) == 2
        fs.files.fetch = real_fetch
        assert await fs.read(ino, 0, 10) == payload[:10]
    assert_clean(img)


@pytest.mark.timeout(60)
async def test_truncate_up_keeps_the_tree_and_both_checkers_accept_it(tmp_path):
    """GFS2 grows a file by truncate without raising its tree height (what lies past
    the tree is a hole); gfspy-fsck once called that a fault (found by fsstress)."""
    img = make_image(tmp_path / "fs.img", size_mib=64)
    async with mounted(img) as fs:
        ino = (await fs.create(fs.root_ino, b"grown", 0o100644, 0, 0)).ino
        await fs.write(ino, 0, b"\x5a" * (1 << 20))
        height = fs.inodes[ino].di.height
        await fs.setattr(ino, SetAttr(size=3_000_000))
        assert fs.inodes[ino].di.height == height
        assert await fs.read(ino, (1 << 20) - 2, 4) == b"\x5a\x5a\0\0"
    assert_clean(img)
    async with mounted(img) as fs:
        ino = (await fs.lookup(fs.root_ino, b"grown")).ino
        assert (await fs.getattr(ino)).size == 3_000_000
        await fs.write(ino, 2_500_000, b"tail")
        assert await fs.read(ino, 2_499_998, 8) == b"\0\0tail\0\0"
    assert_clean(img)
