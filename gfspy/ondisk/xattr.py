"""Extended attributes: EA records inside EA blocks, ED value blocks, and the mapping
between GFS2's numeric namespaces and the Linux "user."/"system."... prefixes.

A record stores its value inline ("stuffed") after the name, or, when too large, a
list of ED block numbers at the next 8-byte boundary after the name.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

from .constants import (
    EA_HEADER_SIZE,
    EAFLAG_LAST,
    EATYPE_SECURITY,
    EATYPE_SYS,
    EATYPE_TRUSTED,
    EATYPE_UNUSED,
    EATYPE_USR,
    META_HEADER_SIZE,
    METATYPE_EA,
    METATYPE_ED,
)
from .errors import FormatError
from .indirect import pack_pointers, unpack_pointers
from .meta import Buffer, MetaHeader, expect_header, need, pad_block

# rec_len, data_len, name_len, type, flags, num_ptrs, 4 pad
_EA_HEADER = struct.Struct(">IIBBBB4x")

#: Namespace prefix of each EA type.
EA_PREFIXES: dict[int, bytes] = {
    EATYPE_USR: b"user.",
    EATYPE_SYS: b"system.",
    EATYPE_SECURITY: b"security.",
    EATYPE_TRUSTED: b"trusted.",
}

#: EA type of each namespace prefix ("user." -> EATYPE_USR ...).
EA_TYPE_BY_PREFIX: dict[bytes, int] = {prefix: ea_type for ea_type, prefix in EA_PREFIXES.items()}


def split_xattr_name(full_name: bytes) -> tuple[int, bytes]:
    """b"user.foo" -> (EATYPE_USR, b"foo"); FormatError for an unknown namespace."""
    for ea_type, prefix in EA_PREFIXES.items():
        if full_name.startswith(prefix):
            return ea_type, full_name[len(prefix) :]
    raise FormatError(f"xattr name {full_name!r} has no known namespace prefix")


def join_xattr_name(ea_type: int, name: bytes) -> bytes:
    """(EATYPE_USR, b"foo") -> b"user.foo"."""
    try:
        return EA_PREFIXES[ea_type] + name
    except KeyError:
        raise FormatError(f"xattr type {ea_type} has no namespace") from None


def _align8(value: int) -> int:
    return (value + 7) & ~7


def ea_is_stuffed(jbsize: int, name_len: int, data_len: int) -> bool:
    """Whether a value of `data_len` bytes is stored inline in its record."""
    return _align8(EA_HEADER_SIZE + name_len + data_len) <= jbsize


def ea_num_ptrs(jbsize: int, data_len: int) -> int:
    """ED blocks needed for an unstuffed value."""
    return -(-data_len // jbsize)


@dataclass(slots=True)
class EARecord:
    """One record of an EA block: 16-byte header, name, then value or ED pointers."""

    rec_len: int
    data_len: int
    name_len: int
    type: int
    flags: int = 0
    num_ptrs: int = 0
    name: bytes = b""
    value: bytes = b""
    pointers: tuple[int, ...] = ()

    HEADER_SIZE: ClassVar[int] = EA_HEADER_SIZE

    @classmethod
    def unused(cls, rec_len: int, last: bool = True) -> EARecord:
        """A free record spanning `rec_len` bytes (a new EA block holds one)."""
        return cls(rec_len, 0, 0, EATYPE_UNUSED, EAFLAG_LAST if last else 0)

    @property
    def is_last(self) -> bool:
        return bool(self.flags & EAFLAG_LAST)

    @property
    def is_stuffed(self) -> bool:
        return self.num_ptrs == 0

    @property
    def size(self) -> int:
        """Bytes the record needs (its rec_len may be larger)."""
        if self.is_stuffed:
            return _align8(EA_HEADER_SIZE + self.name_len + self.data_len)
        return _align8(EA_HEADER_SIZE + self.name_len) + 8 * self.num_ptrs

    def pack(self) -> bytes:
        """Header, name and value (stuffed) or name, padding and ED pointers."""
        header = _EA_HEADER.pack(
            self.rec_len, self.data_len, self.name_len, self.type, self.flags, self.num_ptrs
        )
        if self.is_stuffed:
            return header + self.name + self.value
        padding = bytes(_align8(self.name_len) - self.name_len)
        return header + self.name + padding + pack_pointers(self.pointers)

    @classmethod
    def unpack(cls, buf: Buffer, offset: int = 0) -> EARecord:
        need(buf, offset, EA_HEADER_SIZE, "EA record")
        rec_len, data_len, name_len, ea_type, flags, num_ptrs = _EA_HEADER.unpack_from(buf, offset)
        name_at = offset + EA_HEADER_SIZE
        need(buf, name_at, name_len, "EA record name")
        name = bytes(buf[name_at : name_at + name_len])
        if num_ptrs == 0:
            value_at = name_at + name_len
            if ea_type == EATYPE_UNUSED and value_at + data_len > len(buf):
                value = b""  # a freed record's stale length is not worth failing over
            else:
                need(buf, value_at, data_len, "EA record value")
                value = bytes(buf[value_at : value_at + data_len])
            pointers: tuple[int, ...] = ()
        else:
            value = b""
            pointers = tuple(unpack_pointers(buf, name_at + _align8(name_len), num_ptrs))
        return cls(rec_len, data_len, name_len, ea_type, flags, num_ptrs, name, value, pointers)


def iter_ea_records(block: Buffer, bsize: int | None = None) -> Iterator[tuple[int, EARecord]]:
    """Yield (offset, record) for the records of an EA block, unused ones included.

    FormatError if the header is not EA, a rec_len is 0 or runs past the block, a
    record does not hold what its header claims, or the LAST record does not end
    exactly at the end of the block.
    """
    end = len(block) if bsize is None else bsize
    expect_header(block, 0, METATYPE_EA, "EA block")
    offset = META_HEADER_SIZE
    while True:
        if end - offset < EA_HEADER_SIZE:
            raise FormatError(f"EA record at {offset}: chain runs off the block")
        rec_len = struct.unpack_from(">I", block, offset)[0]
        if rec_len == 0 or offset + rec_len > end:
            raise FormatError(f"EA record at {offset}: bad rec_len {rec_len}")
        record = EARecord.unpack(block, offset)
        if record.type != EATYPE_UNUSED and record.size > rec_len:
            raise FormatError(
                f"EA record at {offset}: needs {record.size} bytes, rec_len {rec_len}"
            )
        yield offset, record
        offset += rec_len
        if record.is_last:
            if offset != end:
                raise FormatError(f"EA block: LAST record ends at {offset}, not {end}")
            return
        if offset == end:
            raise FormatError("EA block: no record carries the LAST flag")


def add_ea_record(block: bytearray | memoryview, record: EARecord) -> int | None:
    """Insert `record` into an EA block in place; returns its offset, or None if no
    record has room.

    An unused record big enough is taken whole; otherwise the first record with
    enough slack is cut to its own size and the new one takes the rest (and the LAST
    flag, if the record it was cut from had it). `record.rec_len`/`flags` are set.
    """
    needed = record.size
    for offset, existing in iter_ea_records(block):
        if existing.type == EATYPE_UNUSED:
            if existing.rec_len < needed:
                continue
            record.rec_len = existing.rec_len
            record.flags = existing.flags & EAFLAG_LAST
            _write_record(block, offset, record, existing.rec_len)
            return offset
        slack = existing.rec_len - existing.size
        if slack >= needed:
            record.rec_len = slack
            record.flags = existing.flags & EAFLAG_LAST
            existing.rec_len = existing.size
            existing.flags &= ~EAFLAG_LAST
            _write_record(block, offset, existing, existing.rec_len)
            _write_record(block, offset + existing.rec_len, record, slack)
            return offset + existing.rec_len
    return None


def remove_ea_record(block: bytearray | memoryview, offset: int) -> EARecord:
    """Delete the record at `offset` from an EA block in place and return it (so the
    caller can free its ED blocks).

    Its space joins the previous record, which inherits the LAST flag; the first
    record has no previous one, so it is marked unused and keeps its length.
    """
    previous: tuple[int, EARecord] | None = None
    for here, existing in iter_ea_records(block):
        if here == offset:
            if existing.type == EATYPE_UNUSED:
                raise FormatError(f"EA record at {offset} is already unused")
            if previous is None:
                freed = EARecord.unused(existing.rec_len, last=existing.is_last)
                _write_record(block, offset, freed, existing.rec_len)
            else:
                prev_offset, prev = previous
                prev.rec_len += existing.rec_len
                prev.flags |= existing.flags & EAFLAG_LAST
                _write_record(block, prev_offset, prev, prev.rec_len)
            return existing
        previous = (here, existing)
    raise FormatError(f"no EA record starts at offset {offset}")


def _write_record(block: bytearray | memoryview, offset: int, record: EARecord, span: int) -> None:
    """Write `record` at `offset`, zeroing the rest of its `span` bytes."""
    packed = record.pack()
    block[offset : offset + span] = packed + bytes(span - len(packed))


def pack_ea_block(bsize: int, records: list[EARecord]) -> bytes:
    """An EA block laid out from `records` as given (their rec_len are trusted)."""
    raw = bytearray(pad_block(MetaHeader.for_type(METATYPE_EA).pack(), bsize, "EA block"))
    offset = META_HEADER_SIZE
    for record in records:
        packed = record.pack()
        if offset + max(len(packed), record.rec_len) > bsize:
            raise FormatError(f"EA block: records overflow a {bsize}-byte block")
        raw[offset : offset + len(packed)] = packed
        offset += record.rec_len
    return bytes(raw)


def new_ea_block(bsize: int) -> bytes:
    """A fresh EA block: one unused LAST record covering the whole payload."""
    return pack_ea_block(bsize, [EARecord.unused(bsize - META_HEADER_SIZE)])


def pack_ed_block(bsize: int, chunk: Buffer) -> bytes:
    """An ED block carrying up to jbsize bytes of an unstuffed value."""
    return pad_block(MetaHeader.for_type(METATYPE_ED).pack() + bytes(chunk), bsize, "ED block")


def ed_payload(block: Buffer, bsize: int | None = None) -> memoryview:
    """The value bytes of an ED block (type checked; includes zero padding)."""
    expect_header(block, 0, METATYPE_ED, "ED block")
    end = len(block) if bsize is None else bsize
    return memoryview(block)[META_HEADER_SIZE:end]


def split_value(value: bytes, jbsize: int) -> list[bytes]:
    """Cut an unstuffed value into ED-block chunks of jbsize bytes."""
    return [value[pos : pos + jbsize] for pos in range(0, len(value), jbsize)] or [b""]
