"""Export backends: a file or block device served with no server-side cache.

Two servers may export the same LUN, so nothing may be cached or delayed here: O_DIRECT
with aligned buffers where the kernel supports it, FLUSH = fdatasync, FUA = RWF_DSYNC,
and unaligned I/O is refused rather than read-modify-written.  Every method is blocking
and meant to run in a worker thread; a returned call means the I/O reached the device
or never will, which is what fencing's drain relies on.
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
import threading

from gfspy.nbd.wire import NbdErrno

log = logging.getLogger(__name__)

BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]

_ZERO_CHUNK = 1 << 20
_MIN_POOLED = 64 * 1024
_POOL_BYTES_PER_CLASS = 64 * 1024 * 1024  # free buffers kept per size class, at most 16


class BackendError(OSError):
    """An I/O failure, with the NBD error value to send back."""

    def __init__(self, nbd_error: NbdErrno, message: str) -> None:
        super().__init__(int(nbd_error), message)
        self.nbd_error = nbd_error


def nbd_error_for(err: int | None) -> NbdErrno:
    """Map an OS errno to the NBD error a client should see."""
    if err in (errno.EPERM, errno.EROFS, errno.EACCES):
        return NbdErrno.EPERM
    if err in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return NbdErrno.ENOSPC
    if err == errno.EINVAL:
        return NbdErrno.EINVAL
    if err in (errno.EOPNOTSUPP, errno.ENOTSUP):
        return NbdErrno.ENOTSUP
    return NbdErrno.EIO


class _BufferPool:
    """Page-aligned (mmap) buffers for O_DIRECT, reused to avoid a mmap per request."""

    def __init__(self) -> None:
        self._free: dict[int, list[mmap.mmap]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _size_class(length: int) -> int:
        return max(_MIN_POOLED, 1 << (max(length, 1) - 1).bit_length())

    def get(self, length: int) -> mmap.mmap:
        size = self._size_class(length)
        with self._lock:
            free = self._free.get(size)
            if free:
                return free.pop()
        return mmap.mmap(-1, size)

    def put(self, buf: mmap.mmap) -> None:
        """Keep the buffer for reuse, or drop it (it unmaps once its last view is gone)."""
        depth = max(2, min(16, _POOL_BYTES_PER_CLASS // len(buf)))
        with self._lock:
            free = self._free.setdefault(len(buf), [])
            if len(free) < depth:
                free.append(buf)


_BUFFERS = _BufferPool()


def allocate_buffer(length: int) -> mmap.mmap:
    """A page-aligned buffer of at least `length` bytes (for WRITE payloads)."""
    return _BUFFERS.get(length)


def release_payload(payload: object) -> None:
    """Give a payload view's buffer back to the pool once the write is done with it."""
    if isinstance(payload, memoryview):
        owner = payload.obj
        payload.release()
        if isinstance(owner, mmap.mmap):
            _BUFFERS.put(owner)


class ReadBuffer:
    """Data read into a pooled aligned buffer, sent straight from there (no copy).

    Call `release` once the bytes are on the wire so the buffer can be reused.
    """

    def __init__(self, pool: _BufferPool | None, buf: mmap.mmap | None, length: int) -> None:
        self._pool = pool
        self._buf = buf
        self.view = memoryview(buf)[:length] if buf is not None else memoryview(b"")

    def __len__(self) -> int:
        return len(self.view)

    def release(self) -> None:
        self.view.release()
        if self._buf is not None and self._pool is not None:
            buf, self._buf = self._buf, None
            self._pool.put(buf)


class FileBackend:
    """A regular file or block device opened for uncached, aligned I/O."""

    def __init__(self, path: str, *, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        try:
            st = os.stat(path)
        except OSError as e:
            raise BackendError(nbd_error_for(e.errno), f"{path}: {e.strerror}") from None
        self.is_blockdev = stat.S_ISBLK(st.st_mode)
        if not (self.is_blockdev or stat.S_ISREG(st.st_mode)):
            raise BackendError(NbdErrno.EINVAL, f"{path}: not a regular file or block device")
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        self.direct = True
        try:
            self.fd = os.open(path, flags | os.O_DIRECT)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise BackendError(nbd_error_for(e.errno), f"{path}: {e.strerror}") from None
            # Only a filesystem without O_DIRECT gets here; its page cache is the only
            # copy of the data on this host, so two exports of it still agree.
            log.warning("%s: O_DIRECT not supported; using buffered I/O", path)
            self.direct = False
            self.fd = os.open(path, flags)
        if self.is_blockdev:
            raw = fcntl.ioctl(self.fd, BLKGETSIZE64, b"\0" * 8)
            device_size = struct.unpack("Q", raw)[0]
            self.block_size = struct.unpack("i", fcntl.ioctl(self.fd, BLKSSZGET, b"\0" * 4))[0]
        else:
            device_size = st.st_size
            self.block_size = self._probe_direct_alignment()
        self.size = device_size - device_size % self.block_size
        if self.size != device_size:
            log.warning(
                "%s: size %d is not a multiple of %d; exporting %d bytes",
                path,
                device_size,
                self.block_size,
                self.size,
            )
        self._pool = _BUFFERS
        self._gen_lock = threading.Lock()
        self._write_generation = 0  # bumped after every completed write
        self._flushed_generation = 0  # the generation the last completed flush covered

    def _probe_direct_alignment(self) -> int:
        """The smallest I/O unit O_DIRECT accepts on this file (512 or 4096 in practice)."""
        if not self.direct:
            return 512
        buf = mmap.mmap(-1, 4096)
        try:
            for size in (512, 1024, 2048, 4096):
                try:
                    os.preadv(self.fd, [memoryview(buf)[:size]], 0)
                    return size
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        break
        finally:
            buf.close()
        return 4096

    # --- operations (blocking) --------------------------------------------------

    def read(self, offset: int, length: int) -> ReadBuffer:
        if length == 0:
            return ReadBuffer(None, None, 0)
        result = ReadBuffer(self._pool, self._pool.get(length), length)
        try:
            got = os.preadv(self.fd, [result.view], offset)
        except OSError as e:
            result.release()
            raise BackendError(nbd_error_for(e.errno), f"read at {offset}: {e.strerror}") from e
        if got != length:
            result.release()
            raise BackendError(NbdErrno.EIO, f"short read at {offset}: {got} of {length}")
        return result

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        """Write `data`; a view over a pooled buffer goes to the disk without a copy."""
        length = len(data)
        if length == 0:
            return
        flags = os.RWF_DSYNC if fua else 0
        try:
            if isinstance(data, memoryview) and isinstance(data.obj, mmap.mmap):
                done = os.pwritev(self.fd, [data], offset, flags)  # page-aligned already
            else:
                buf = self._pool.get(length)
                try:
                    with memoryview(buf)[:length] as view:
                        view[:] = data
                        done = os.pwritev(self.fd, [view], offset, flags)
                finally:
                    self._pool.put(buf)
        except OSError as e:
            raise BackendError(nbd_error_for(e.errno), f"write at {offset}: {e.strerror}") from e
        if done != length:
            raise BackendError(NbdErrno.EIO, f"short write at {offset}: {done} of {length}")
        self._wrote()

    def _wrote(self) -> None:
        with self._gen_lock:
            self._write_generation += 1

    def flush(self) -> None:
        """fdatasync, skipped when nothing was written since the last completed flush.

        The generation is read before syncing and recorded only after the sync returns,
        so a write that completes during the sync is still flushed by the next FLUSH.
        """
        with self._gen_lock:
            target = self._write_generation
            if target == self._flushed_generation:
                return
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise BackendError(nbd_error_for(e.errno), f"flush: {e.strerror}") from e
        with self._gen_lock:
            self._flushed_generation = max(self._flushed_generation, target)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """A hint: discard what the device lets us, ignore 'not supported'."""
        if length == 0:
            return
        try:
            if self.is_blockdev:
                fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("QQ", offset, length))
            else:
                self._fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY):
                raise BackendError(nbd_error_for(e.errno), f"trim at {offset}: {e.strerror}") from e
            return
        self._wrote()
        if fua:
            self.flush()

    def write_zeroes(self, offset: int, length: int, may_punch: bool, fua: bool = False) -> None:
        """Zero a range without sending data: punch or zero-range, else write zeroes."""
        if length == 0:
            return
        try:
            if self.is_blockdev:
                fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", offset, length))
            else:
                mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE if may_punch else 0
                self._fallocate(mode or FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
            self._wrote()
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                raise BackendError(nbd_error_for(e.errno), f"zero at {offset}: {e.strerror}") from e
            self._write_zero_buffers(offset, length)
        if fua:
            self.flush()

    def _write_zero_buffers(self, offset: int, length: int) -> None:
        zeros = bytes(min(_ZERO_CHUNK, length))
        end = offset + length
        while offset < end:
            n = min(_ZERO_CHUNK, end - offset)
            self.write(offset, zeros[:n])
            offset += n

    def _fallocate(self, mode: int, offset: int, length: int) -> None:
        if _libc.fallocate(self.fd, mode, offset, length) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            try:
                os.close(fd)
            except OSError as e:  # e.g. the backing filesystem went away first
                log.warning("%s: close failed: %s", self.path, e)


def detect_wwid(path: str) -> str | None:
    """The WWID the kernel reports for a block device (SCSI or NVMe), if any."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    base = f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    for candidate in ("device/wwid", "wwid"):
        try:
            with open(os.path.join(base, candidate), encoding="ascii", errors="replace") as f:
                wwid = f.read().strip()
        except OSError:
            continue
        if wwid:
            return wwid
    return None
