"""Bad input at mount: one clear FsError, and not one byte of the device written."""

from __future__ import annotations

import errno
import hashlib
import struct

import pytest

from gfspy.blockdev.local import LocalDevice
from gfspy.fs.api import FileSystem, FsError

from .helpers import make_image, mounted

SB_OFFSET = 65536


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def _refused(path, **kwargs) -> FsError:
    before = _digest(path)
    device = await LocalDevice.open(str(path))
    try:
        with pytest.raises(FsError) as info:
            fs = await FileSystem.open(device, **kwargs)
            await fs.close()
    finally:
        await device.aclose()
    assert _digest(path) == before, "a refused mount wrote to the device"
    return info.value


def _patch(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.timeout(30)
async def test_not_gfs2(tmp_path):
    img = tmp_path / "zero.img"
    img.write_bytes(bytes(1 << 20))
    err = await _refused(img)
    assert err.errno == errno.EINVAL and "not a GFS2 filesystem" in str(err)


@pytest.mark.timeout(30)
async def test_unsupported_format(tmp_path):
    img = make_image(tmp_path / "fs.img", size_mib=64)
    _patch(img, SB_OFFSET + 24, struct.pack(">I", 1803))
    err = await _refused(img)
    assert err.errno == errno.EINVAL and "format 1803" in str(err)


@pytest.mark.timeout(30)
async def test_lock_dlm_needs_override(tmp_path):
    img = make_image(tmp_path / "fs.img", size_mib=64, lockproto="lock_dlm")
    err = await _refused(img)
    assert err.errno == errno.EINVAL and "lock_dlm" in str(err)
    async with mounted(img, lockproto="lock_nolock") as fs:  # the documented override
        await fs.mkdir(fs.root_ino, b"ok", 0o755, 0, 0)


@pytest.mark.timeout(30)
async def test_fsck_running(tmp_path):
    img = make_image(tmp_path / "fs.img", size_mib=64)
    _patch(img, SB_OFFSET + 96, b"fsck_")
    err = await _refused(img)
    assert err.errno == errno.EINVAL and "fsck" in str(err)


@pytest.mark.timeout(30)
async def test_corrupt_root(tmp_path):
    img = make_image(tmp_path / "fs.img", size_mib=64)
    raw = img.read_bytes()
    root_addr = struct.unpack_from(">Q", raw, SB_OFFSET + 88)[0]
    _patch(img, root_addr * 4096, b"\0" * 8)  # wipe the magic and type
    err = await _refused(img)
    assert err.errno == errno.EIO and "corrupt" in str(err)


@pytest.mark.timeout(30)
async def test_readonly_mount_writes_nothing(tmp_path):
    img = make_image(tmp_path / "fs.img", size_mib=64)
    before = _digest(img)
    async with mounted(img, readonly=True) as fs:
        assert (await fs.getattr(fs.root_ino)).nlink == 2
        with pytest.raises(FsError) as info:
            await fs.mkdir(fs.root_ino, b"x", 0o755, 0, 0)
        assert info.value.errno == errno.EROFS
    assert _digest(img) == before
