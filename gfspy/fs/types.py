"""Values that cross the fs API: attributes, statfs, errors and flag constants.

Kept apart from the implementation so the FUSE layer and the fs agree on them
without importing each other's internals.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

__all__ = [
    "NOW",
    "RENAME_EXCHANGE",
    "RENAME_NOREPLACE",
    "XATTR_CREATE",
    "XATTR_REPLACE",
    "Attr",
    "FsError",
    "FsWithdrawn",
    "SetAttr",
    "StatFs",
]

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_CREATE = 1
XATTR_REPLACE = 2

#: SetAttr time value meaning "the current time" (utimensat's UTIME_NOW); INT64_MIN,
#: so that every real timestamp, even before 1970, stays expressible.
NOW = -(1 << 63)


class FsError(OSError):
    """A POSIX error for the caller; .errno is what FUSE should return."""

    def __init__(self, err: int, message: str | None = None) -> None:
        super().__init__(err, message or errno.errorcode.get(err, str(err)))


class FsWithdrawn(FsError):
    """The metadata was found inconsistent; the fs stopped all device I/O."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, f"withdrawn: {message}")


@dataclass
class Attr:
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int  # 512-byte units
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    generation: int
    blksize: int


@dataclass
class SetAttr:
    """Attributes to change; None leaves a field alone, NOW means the current time."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    ctime_ns: int | None = None


@dataclass
class StatFs:
    bsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    namemax: int = 255
