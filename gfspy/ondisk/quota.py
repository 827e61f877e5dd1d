"""Quota structures: entries of the master `quota` file and the records of each
journal's `quota_change` file, whose every block carries a QC header.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from .constants import (
    META_HEADER_SIZE,
    METATYPE_QC,
    QCF_USER,
    QUOTA_CHANGE_SIZE,
    QUOTA_ENTRY_SIZE,
)
from .errors import FormatError
from .meta import Buffer, MetaHeader, expect_header, need, pad_block

_CHANGE = struct.Struct(">qII")
# limit, warn, value, 64 reserved
_ENTRY = struct.Struct(">QQq64x")


@dataclass(slots=True)
class QuotaChange:
    """gfs2_quota_change: a pending usage delta for one user or group id."""

    change: int = 0
    flags: int = 0
    id: int = 0

    SIZE: ClassVar[int] = QUOTA_CHANGE_SIZE

    @property
    def is_user(self) -> bool:
        return bool(self.flags & QCF_USER)

    def pack(self) -> bytes:
        return _CHANGE.pack(self.change, self.flags, self.id)

    @classmethod
    def unpack(cls, buf: Buffer, offset: int = 0) -> QuotaChange:
        need(buf, offset, cls.SIZE, "quota change")
        return cls(*_CHANGE.unpack_from(buf, offset))


def qc_per_block(bsize: int) -> int:
    return (bsize - META_HEADER_SIZE) // QUOTA_CHANGE_SIZE


def pack_qc_block(bsize: int, records: list[QuotaChange] | None = None) -> bytes:
    """A quota_change data block: QC header then up to qc_per_block records."""
    records = records or []
    if len(records) > qc_per_block(bsize):
        raise FormatError(f"quota_change block: {len(records)} records do not fit")
    body = b"".join(record.pack() for record in records)
    return pad_block(MetaHeader.for_type(METATYPE_QC).pack() + body, bsize, "QC block")


def unpack_qc_block(block: Buffer, bsize: int | None = None) -> list[QuotaChange]:
    """All record slots of a QC block (type checked), empty ones included."""
    size = len(block) if bsize is None else bsize
    expect_header(block, 0, METATYPE_QC, "quota_change block")
    return [
        QuotaChange.unpack(block, META_HEADER_SIZE + index * QUOTA_CHANGE_SIZE)
        for index in range(qc_per_block(size))
    ]


@dataclass(slots=True)
class QuotaEntry:
    """gfs2_quota: limit, warning level and usage (in blocks) for one id."""

    limit: int = 0
    warn: int = 0
    value: int = 0

    SIZE: ClassVar[int] = QUOTA_ENTRY_SIZE

    def pack(self) -> bytes:
        return _ENTRY.pack(self.limit, self.warn, self.value)

    @classmethod
    def unpack(cls, buf: Buffer, offset: int = 0) -> QuotaEntry:
        need(buf, offset, cls.SIZE, "quota entry")
        return cls(*_ENTRY.unpack_from(buf, offset))


def quota_offset(qid: int, is_group: bool) -> int:
    """Byte offset of the entry for a user (or group) id in the quota file."""
    return QUOTA_ENTRY_SIZE * (2 * qid + (1 if is_group else 0))
