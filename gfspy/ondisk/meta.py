"""The 24-byte header that starts every metadata block, and the 16-byte inode number.

Decoders of every block type go through `MetaHeader.unpack` / `expect_header` so a
wrong magic or type is reported the same way everywhere.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from .constants import FORMAT_FOR_TYPE, GFS2_MAGIC, METATYPE_NAMES
from .errors import FormatError

Buffer = bytes | bytearray | memoryview

# magic, type, pad (gfs1 generation), format, jid (pad outside log headers)
_HEADER = struct.Struct(">II8xII")
_MAGIC = struct.Struct(">I")
_INUM = struct.Struct(">QQ")


def type_name(mh_type: int) -> str:
    """Readable name of a metadata type for messages."""
    return METATYPE_NAMES.get(mh_type, f"type {mh_type}")


def need(buf: Buffer, offset: int, size: int, what: str) -> None:
    """Raise FormatError unless `size` bytes of `what` fit in `buf` at `offset`."""
    if offset < 0 or len(buf) - offset < size:
        raise FormatError(f"{what}: need {size} bytes at offset {offset}, buffer has {len(buf)}")


@dataclass(slots=True)
class MetaHeader:
    """gfs2_meta_header: magic, type, format and (in log headers) the writer's jid."""

    mh_type: int
    mh_format: int
    mh_jid: int = 0

    SIZE: ClassVar[int] = 24

    @classmethod
    def for_type(cls, mh_type: int, mh_jid: int = 0) -> MetaHeader:
        """Header with the format number that belongs to `mh_type`."""
        return cls(mh_type, FORMAT_FOR_TYPE[mh_type], mh_jid)

    def pack(self) -> bytes:
        return _HEADER.pack(GFS2_MAGIC, self.mh_type, self.mh_format, self.mh_jid)

    def pack_into(self, buf: bytearray | memoryview, offset: int = 0) -> None:
        _HEADER.pack_into(buf, offset, GFS2_MAGIC, self.mh_type, self.mh_format, self.mh_jid)

    @classmethod
    def unpack(cls, buf: Buffer, offset: int = 0) -> MetaHeader:
        """Decode a header; FormatError if the magic is missing."""
        need(buf, offset, cls.SIZE, "metadata header")
        magic, mh_type, mh_format, mh_jid = _HEADER.unpack_from(buf, offset)
        if magic != GFS2_MAGIC:
            raise FormatError(f"metadata header: bad magic 0x{magic:08x}")
        return cls(mh_type, mh_format, mh_jid)


def peek_type(buf: Buffer, offset: int = 0) -> int | None:
    """mh_type of the block at `offset`, or None if it does not start with the magic.

    Used to classify blocks (journal scanning, fsck) without raising.
    """
    if offset < 0 or len(buf) - offset < 8:
        return None
    magic, mh_type = struct.unpack_from(">II", buf, offset)
    return mh_type if magic == GFS2_MAGIC else None


def expect_header(
    buf: Buffer, offset: int, mh_type: int, what: str, check_format: bool = False
) -> MetaHeader:
    """Decode a header and insist on the magic and `mh_type`.

    The format number is checked only with `check_format`: the kernel and libgfs2
    look at magic and type alone, so a reader that refused other formats would reject
    images they accept. `what` names the structure in the message ("leaf block"...).
    """
    need(buf, offset, MetaHeader.SIZE, what)
    magic, found_type, found_format, jid = _HEADER.unpack_from(buf, offset)
    if magic != GFS2_MAGIC:
        raise FormatError(f"{what}: bad magic 0x{magic:08x}")
    if found_type != mh_type:
        raise FormatError(
            f"{what}: expected {type_name(mh_type)} block, found {type_name(found_type)}"
        )
    expected_format = FORMAT_FOR_TYPE.get(mh_type)
    if check_format and expected_format is not None and found_format != expected_format:
        raise FormatError(f"{what}: bad format {found_format}, expected {expected_format}")
    return MetaHeader(found_type, found_format, jid)


@dataclass(frozen=True, slots=True)
class Inum:
    """An inode number: formal number (checked against dirents) and block address."""

    formal: int
    addr: int

    SIZE: ClassVar[int] = 16

    def pack(self) -> bytes:
        return _INUM.pack(self.formal, self.addr)

    @classmethod
    def unpack(cls, buf: Buffer, offset: int = 0) -> Inum:
        need(buf, offset, cls.SIZE, "inum")
        return cls(*_INUM.unpack_from(buf, offset))


def has_magic(buf: Buffer, offset: int = 0) -> bool:
    """True if the bytes at `offset` begin with GFS2_MAGIC (JDATA escaping, scans)."""
    return len(buf) - offset >= 4 and _MAGIC.unpack_from(buf, offset)[0] == GFS2_MAGIC


def pad_block(data: Buffer, bsize: int, what: str) -> bytes:
    """`data` zero-padded to a full block; FormatError if it does not fit."""
    if len(data) > bsize:
        raise FormatError(f"{what}: {len(data)} bytes do not fit a {bsize}-byte block")
    return bytes(data) + bytes(bsize - len(data))
