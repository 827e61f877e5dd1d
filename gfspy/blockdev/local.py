"""A local image file or block device.

Block devices are opened with O_DIRECT so that a write really reaches the shared disk
rather than this host's page cache (another node on the same host would not see it
otherwise); image files fall back to buffered I/O where O_DIRECT is not supported.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct

import trio

from gfspy.blockdev.device import Device, DeviceError

log = logging.getLogger(__name__)

BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
BLKDISCARD = 0x1277
_FALLOC_KEEP_SIZE = 0x01
_FALLOC_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)


class LocalDevice(Device):
    """A file or block device on this host."""

    def __init__(
        self,
        fd: int,
        name: str,
        size: int,
        block_size: int,
        readonly: bool,
        direct: bool,
        is_blockdev: bool,
    ) -> None:
        self._fd = fd
        self.name = name
        self.size = size
        self.block_size = block_size
        self.readonly = readonly
        self.direct = direct
        self.is_blockdev = is_blockdev

    @classmethod
    async def open(
        cls, path: str, *, readonly: bool = False, direct: bool | None = None
    ) -> LocalDevice:
        """Open `path`; raise DeviceError with a clear message when it cannot be used."""
        return await trio.to_thread.run_sync(cls._open_sync, path, readonly, direct)

    @classmethod
    def _open_sync(cls, path: str, readonly: bool, direct: bool | None) -> LocalDevice:
        try:
            st = os.stat(path)
        except OSError as e:
            raise DeviceError(e.errno or errno.EIO, f"{path}: {e.strerror}") from None
        is_blockdev = stat.S_ISBLK(st.st_mode)
        if not (is_blockdev or stat.S_ISREG(st.st_mode)):
            raise DeviceError(errno.EINVAL, f"{path}: not a regular file or block device")
        flags = os.O_RDONLY if readonly else os.O_RDWR
        flags |= os.O_CLOEXEC
        want_direct = is_blockdev if direct is None else direct
        fd = -1
        if want_direct:
            try:
                fd = os.open(path, flags | os.O_DIRECT)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise DeviceError(e.errno or errno.EIO, f"{path}: {e.strerror}") from None
                log.info("%s: O_DIRECT not supported, using buffered I/O", path)
        if fd < 0:
            want_direct = False
            try:
                fd = os.open(path, flags)
            except OSError as e:
                raise DeviceError(e.errno or errno.EIO, f"{path}: {e.strerror}") from None
        if is_blockdev:
            buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
            size = struct.unpack("Q", buf)[0]
            sector = struct.unpack("i", fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4))[0]
        else:
            size = st.st_size
            sector = 512
        return cls(fd, path, size, sector, readonly, want_direct, is_blockdev)

    def claim(self, exclusive: bool) -> None:
        """An advisory flock on the file or device node, released when it closes."""
        try:
            fcntl.flock(self._fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DeviceError(errno.EBUSY, f"{self.name}: in use by another gfspy mount") from None
        except OSError as e:
            raise DeviceError(e.errno or errno.EIO, f"{self.name}: cannot lock: {e}") from None

    async def read(self, offset: int, length: int) -> bytes:
        self.check_range(offset, length)
        return await trio.to_thread.run_sync(self._pread, offset, length)

    def _pread(self, offset: int, length: int) -> bytes:
        if self.direct:
            buf = mmap.mmap(-1, max(length, mmap.PAGESIZE))  # page-aligned for O_DIRECT
            try:
                n = os.preadv(self._fd, [memoryview(buf)[:length]], offset)
                data = bytes(memoryview(buf)[:n])
            finally:
                buf.close()
        else:
            data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise DeviceError(errno.EIO, f"{self.name}: short read at {offset}")
        return data

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.readonly:
            raise DeviceError(errno.EROFS, f"{self.name}: opened read-only")
        self.check_range(offset, len(data))
        await trio.to_thread.run_sync(self._pwrite, offset, data)

    def _pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.direct:
            buf = mmap.mmap(-1, max(len(data), mmap.PAGESIZE))
            try:
                buf[: len(data)] = data
                written = os.pwritev(self._fd, [memoryview(buf)[: len(data)]], offset)
            finally:
                buf.close()
        else:
            written = os.pwrite(self._fd, data, offset)
        if written != len(data):
            raise DeviceError(errno.EIO, f"{self.name}: short write at {offset}")

    async def flush(self) -> None:
        if not self.readonly:
            await trio.to_thread.run_sync(os.fsync, self._fd)

    async def discard(self, offset: int, length: int) -> None:
        self.check_range(offset, length)
        if self.readonly:
            raise DeviceError(errno.EROFS, f"{self.name}: opened read-only")
        if self.is_blockdev:
            arg = struct.pack("QQ", offset, length)
            await trio.to_thread.run_sync(fcntl.ioctl, self._fd, BLKDISCARD, arg)
        else:
            await trio.to_thread.run_sync(self._punch_hole, offset, length)

    async def write_zeroes(self, offset: int, length: int) -> None:
        if not self.is_blockdev and not self.readonly:
            self.check_range(offset, length)
            await trio.to_thread.run_sync(self._punch_hole, offset, length)
        else:
            await super().write_zeroes(offset, length)

    def _punch_hole(self, offset: int, length: int) -> None:
        """Deallocate a file range so it reads back as zeros; write zeros if we cannot."""
        rc = _libc.fallocate(
            self._fd,
            _FALLOC_KEEP_SIZE | _FALLOC_PUNCH_HOLE,
            ctypes.c_long(offset),
            ctypes.c_long(length),
        )
        if rc != 0:
            self._pwrite(offset, bytes(length))

    async def aclose(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
