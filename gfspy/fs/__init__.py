"""The filesystem logic of mount.gfspy: inodes, directories, allocation, xattrs."""

from gfspy.fs.filesystem import FileSystem
from gfspy.fs.types import (
    NOW,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    XATTR_CREATE,
    XATTR_REPLACE,
    Attr,
    FsError,
    FsWithdrawn,
    SetAttr,
    StatFs,
)

__all__ = [
    "NOW",
    "RENAME_EXCHANGE",
    "RENAME_NOREPLACE",
    "XATTR_CREATE",
    "XATTR_REPLACE",
    "Attr",
    "FileSystem",
    "FsError",
    "FsWithdrawn",
    "SetAttr",
    "StatFs",
]
