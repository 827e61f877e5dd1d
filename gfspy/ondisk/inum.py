"""The legacy inode-number files: master `inum` (the next formal number) and each
journal's `inum_range` (start, length). Modern kernels ignore both, but fsck insists
they exist with these exact sizes, so mkfs and fsck need their codecs.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from .constants import INUM_RANGE_SIZE
from .meta import Buffer, need

_RANGE = struct.Struct(">QQ")
_NEXT = struct.Struct(">Q")
INUM_FILE_SIZE = _NEXT.size


@dataclass(slots=True)
class InumRange:
    """gfs2_inum_range: a block of formal numbers reserved by one node (legacy)."""

    start: int = 0
    length: int = 0

    SIZE: ClassVar[int] = INUM_RANGE_SIZE

    def pack(self) -> bytes:
        return _RANGE.pack(self.start, self.length)

    @classmethod
    def unpack(cls, buf: Buffer, offset: int = 0) -> InumRange:
        need(buf, offset, cls.SIZE, "inum_range")
        return cls(*_RANGE.unpack_from(buf, offset))


def pack_next_inum(value: int) -> bytes:
    """Contents of the master `inum` file: the next formal number to hand out."""
    return _NEXT.pack(value)


def unpack_next_inum(buf: Buffer, offset: int = 0) -> int:
    need(buf, offset, INUM_FILE_SIZE, "inum file")
    return _NEXT.unpack_from(buf, offset)[0]
