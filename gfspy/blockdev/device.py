"""The one interface every layer above uses to reach the shared disk.

It is async because the remote implementations (NBD, multipath) are network clients
running under trio; the local implementation pushes its blocking syscalls to a worker
thread so the trio loop never stalls.
"""

from __future__ import annotations

import abc
import errno


class DeviceError(OSError):
    """An I/O error from a device, carrying an errno so callers can classify it."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)


class Device(abc.ABC):
    """A block device: byte-addressed I/O in multiples of `block_size`.

    Offsets and lengths must be multiples of `block_size` (the device's minimum I/O
    unit, 512 for most); unaligned requests fail with EINVAL rather than being
    read-modify-written behind the caller's back, because two nodes may share the disk.
    """

    #: Size of the device in bytes.
    size: int
    #: Minimum I/O granularity in bytes.
    block_size: int = 512
    #: Human-readable name for messages (a path or URI).
    name: str = "?"
    #: True when the device was opened read-only.
    readonly: bool = False

    @abc.abstractmethod
    async def read(self, offset: int, length: int) -> bytes:
        """Read `length` bytes at `offset`."""

    @abc.abstractmethod
    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write `data` at `offset`. Durable only after `flush` (or with `fua=True`)."""

    @abc.abstractmethod
    async def flush(self) -> None:
        """Make every completed write durable."""

    async def discard(self, offset: int, length: int) -> None:  # noqa: B027
        """Hint that a range is unused; the default does nothing."""

    def claim(self, exclusive: bool) -> None:  # noqa: B027
        """Keep other gfspy processes on this host from using the device at the same
        time (exclusive), or from writing it (shared); DeviceError(EBUSY) if one does.
        Held until close. The default, for remote devices, does nothing."""

    async def write_zeroes(self, offset: int, length: int) -> None:
        """Write zeros over a range (implementations may do this without sending data)."""
        chunk = 1 << 20
        zeros = bytes(min(chunk, length))
        end = offset + length
        while offset < end:
            n = min(chunk, end - offset)
            await self.write(offset, zeros[:n])
            offset += n

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release the device."""

    async def __aenter__(self) -> Device:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def check_range(self, offset: int, length: int) -> None:
        """Refuse unaligned or out-of-range requests with a DeviceError."""
        if offset % self.block_size or length % self.block_size:
            raise DeviceError(errno.EINVAL, f"{self.name}: unaligned I/O at {offset}+{length}")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise DeviceError(
                errno.EINVAL, f"{self.name}: I/O at {offset}+{length} beyond size {self.size}"
            )


async def open_device(spec: str, *, readonly: bool = False) -> Device:
    """Open a device named by a local path, an nbd:// URI, or comma-separated URIs.

    Several comma-separated URIs make one multipath device.
    """
    if "," in spec or spec.startswith(("nbd://", "nbds://", "nbd+unix://")):
        from gfspy.blockdev import remote  # the NBD and multipath clients

        return await remote.open_remote(spec, readonly=readonly)
    from gfspy.blockdev.local import LocalDevice

    return await LocalDevice.open(spec, readonly=readonly)
