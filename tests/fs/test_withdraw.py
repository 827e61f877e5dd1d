"""A metadata inconsistency withdraws the mount: the operation gets EIO, every later
one too, and nothing more is written to the device (not even at close)."""

from __future__ import annotations

import errno
import hashlib
import struct

import pytest

from gfspy.fs.api import FsError, FsWithdrawn

from .helpers import make_image, mounted, write_file


@pytest.mark.timeout(30)
async def test_corrupt_dinode_withdraws_without_writing(tmp_path):
    img = make_image(tmp_path / "fs.img", size_mib=64)
    async with mounted(img) as fs:
        d = (await fs.mkdir(fs.root_ino, b"d", 0o755, 0, 0)).ino
        await write_file(fs, d, b"f", b"data")
        await write_file(fs, fs.root_ino, b"other", b"x")
    with open(img, "r+b") as f:  # turn d's dinode into an "indirect block"
        f.seek(d * 4096 + 4)
        f.write(struct.pack(">I", 5))
    before = hashlib.sha256(img.read_bytes()).hexdigest()
    async with mounted(img) as fs:
        with pytest.raises(FsWithdrawn) as info:
            await fs.lookup(fs.root_ino, b"d")
        assert info.value.errno == errno.EIO
        assert fs.withdrawn and str(d) in fs.withdrawn
        with pytest.raises(FsError) as info:  # healthy parts are refused too now
            await fs.create(fs.root_ino, b"new", 0o100644, 0, 0)
        assert info.value.errno == errno.EIO
    assert hashlib.sha256(img.read_bytes()).hexdigest() == before


@pytest.mark.timeout(30)
async def test_stale_inode_numbers_are_estale_not_a_withdraw(tmp_path):
    img = make_image(tmp_path / "fs.img", size_mib=64)
    async with mounted(img) as fs:
        data = await write_file(fs, fs.root_ino, b"data", b"")
        ino = await write_file(fs, fs.root_ino, b"gone", b"x")
        await fs.unlink(fs.root_ino, b"gone")
        await fs.forget(ino)  # what the kernel does once nothing names it
        await fs.fsync(ino, False)  # the freed block may now be handed out for data
        await fs.write(data, 0, bytes(range(256)) * 64)
        for stale in (ino, 1, 17, 10**12):
            with pytest.raises(FsError) as info:
                await fs.getattr(stale)
            assert info.value.errno == errno.ESTALE, stale
        assert fs.withdrawn is None
        assert (await fs.getattr(data)).size == 16384
