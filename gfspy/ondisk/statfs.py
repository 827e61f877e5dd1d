"""The statfs files: the master `statfs` totals and each journal's `statfs_change`
deltas share one 24-byte layout of signed 64-bit counters.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from .constants import STATFS_CHANGE_SIZE
from .meta import Buffer, need

_STATFS = struct.Struct(">qqq")


@dataclass(slots=True)
class StatfsChange:
    """gfs2_statfs_change: total, free and dinode block counts (or deltas)."""

    total: int = 0
    free: int = 0
    dinodes: int = 0

    SIZE: ClassVar[int] = STATFS_CHANGE_SIZE

    def pack(self) -> bytes:
        return _STATFS.pack(self.total, self.free, self.dinodes)

    @classmethod
    def unpack(cls, buf: Buffer, offset: int = 0) -> StatfsChange:
        need(buf, offset, cls.SIZE, "statfs")
        return cls(*_STATFS.unpack_from(buf, offset))

    def __add__(self, other: StatfsChange) -> StatfsChange:
        """Fold a delta into totals, as the kernel folds statfs_change into statfs."""
        return StatfsChange(
            self.total + other.total, self.free + other.free, self.dinodes + other.dinodes
        )
