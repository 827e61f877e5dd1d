"""Journal blocks: log headers, log descriptors (metadata, jdata, revoke), revoke
continuation (LB) blocks, and the escaping of journaled data.

These are codecs only; finding the head, writing transactions and replaying them is
the journal layer's job.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import ClassVar

from .checksums import lh_crc, lh_hash
from .constants import (
    FORMAT_LH,
    GFS2_MAGIC,
    LD_JDATA,
    LD_METADATA,
    LD_REVOKE,
    LH_UNMOUNT,
    LOG_DESCRIPTOR_SIZE,
    LOG_HEADER_SIZE,
    META_HEADER_SIZE,
    METATYPE_LB,
    METATYPE_LD,
    METATYPE_LH,
)
from .errors import FormatError
from .indirect import pack_pointers, unpack_pointers
from .meta import Buffer, MetaHeader, expect_header, has_magic, need, pad_block

# sequence, flags, tail, blkno, hash, crc, nsec, sec, addr, jinode, statfs_addr,
# quota_addr, local_total, local_free, local_dinodes
_LH_BODY = struct.Struct(">QIIIIIIQQQQQqqq")
_LH_HASH_OFFSET = 44
_LH_CRC_OFFSET = 48
# type, length, data1, data2, 32 reserved
_LD_BODY = struct.Struct(">IIII32x")


@dataclass(slots=True)
class LogHeader:
    """gfs2_log_header. `hash`/`crc` are as read; pack_block recomputes them."""

    sequence: int
    flags: int
    tail: int
    blkno: int
    nsec: int = 0
    sec: int = 0
    addr: int = 0
    jinode: int = 0
    statfs_addr: int = 0
    quota_addr: int = 0
    local_total: int = 0
    local_free: int = 0
    local_dinodes: int = 0
    jid: int = 0
    hash: int = field(default=0, compare=False)
    crc: int = field(default=0, compare=False)

    SIZE: ClassVar[int] = LOG_HEADER_SIZE

    def pack(self) -> bytes:
        """The 120 struct bytes with lh_hash computed and lh_crc as stored in `crc`.

        lh_crc covers the whole block, so only pack_block can compute it.
        """
        raw = bytearray(MetaHeader(METATYPE_LH, FORMAT_LH, self.jid).pack())
        raw += _LH_BODY.pack(
            self.sequence,
            self.flags,
            self.tail,
            self.blkno,
            0,
            self.crc,
            self.nsec,
            self.sec,
            self.addr,
            self.jinode,
            self.statfs_addr,
            self.quota_addr,
            self.local_total,
            self.local_free,
            self.local_dinodes,
        )
        self.hash = lh_hash(raw)
        struct.pack_into(">I", raw, _LH_HASH_OFFSET, self.hash)
        return bytes(raw)

    def pack_block(self, bsize: int, with_crc: bool = True) -> bytes:
        """The whole journal block with lh_hash and (unless `with_crc` is False, as
        fsck writes after replay) lh_crc filled in."""
        self.crc = 0
        raw = bytearray(pad_block(self.pack(), bsize, "log header"))
        if with_crc:
            self.crc = lh_crc(raw)
            struct.pack_into(">I", raw, _LH_CRC_OFFSET, self.crc)
        return bytes(raw)

    @property
    def is_clean(self) -> bool:
        """True if this header marks the journal as cleanly unmounted."""
        return bool(self.flags & LH_UNMOUNT)

    @classmethod
    def unpack(cls, buf: Buffer, offset: int = 0) -> LogHeader:
        """Decode without checking the checksums (see `verify`)."""
        header = expect_header(buf, offset, METATYPE_LH, "log header")
        need(buf, offset, cls.SIZE, "log header")
        sequence, flags, tail, blkno, lhash, crc, *rest = _LH_BODY.unpack_from(
            buf, offset + META_HEADER_SIZE
        )
        return cls(sequence, flags, tail, blkno, *rest, jid=header.mh_jid, hash=lhash, crc=crc)

    @staticmethod
    def verify(block: Buffer) -> bool:
        """True if `block` is a valid log header: magic, type LH, lh_hash right, and
        lh_crc either absent (0) or right over the rest of the block."""
        if len(block) < LOG_HEADER_SIZE:
            return False
        magic, mh_type = struct.unpack_from(">II", block, 0)
        if magic != GFS2_MAGIC or mh_type != METATYPE_LH:
            return False
        stored_hash, stored_crc = struct.unpack_from(">II", block, _LH_HASH_OFFSET)
        if stored_hash != lh_hash(block):
            return False
        return stored_crc == 0 or stored_crc == lh_crc(block)


@dataclass(slots=True)
class LogDescriptor:
    """gfs2_log_descriptor plus its item list.

    METADATA: `blocks` are the in-place addresses of the copies that follow.
    JDATA: `blocks` with a parallel `escaped` list (1 = first 4 bytes were the magic).
    REVOKE: `blocks` holds only the numbers stored in this block; use unpack_revokes
    to gather the continuation (LB) blocks too.
    """

    ld_type: int
    length: int
    data1: int
    data2: int = 0
    blocks: list[int] = field(default_factory=list)
    escaped: list[int] = field(default_factory=list)

    SIZE: ClassVar[int] = LOG_DESCRIPTOR_SIZE

    @classmethod
    def metadata(cls, blocks: list[int]) -> LogDescriptor:
        return cls(LD_METADATA, len(blocks) + 1, len(blocks), 0, list(blocks))

    @classmethod
    def jdata(cls, blocks: list[int], escaped: list[int]) -> LogDescriptor:
        if len(blocks) != len(escaped):
            raise ValueError("jdata descriptor: blocks and escaped flags differ in length")
        return cls(LD_JDATA, len(blocks) + 1, len(blocks), 0, list(blocks), list(escaped))

    def _items(self) -> list[int]:
        if self.ld_type == LD_JDATA:
            items = []
            for block, esc in zip(self.blocks, self.escaped, strict=True):
                items += (block, esc)
            return items
        return self.blocks

    def pack(self) -> bytes:
        """Descriptor struct followed by its items."""
        header = MetaHeader.for_type(METATYPE_LD).pack()
        body = _LD_BODY.pack(self.ld_type, self.length, self.data1, self.data2)
        return header + body + pack_pointers(self._items())

    def pack_block(self, bsize: int) -> bytes:
        return pad_block(self.pack(), bsize, "log descriptor")

    @classmethod
    def unpack(cls, buf: Buffer, offset: int = 0) -> LogDescriptor:
        """Decode a descriptor block; unknown ld_types decode with no items so replay
        can still skip them by `length`."""
        expect_header(buf, offset, METATYPE_LD, "log descriptor")
        need(buf, offset, cls.SIZE, "log descriptor")
        ld_type, length, data1, data2 = _LD_BODY.unpack_from(buf, offset + META_HEADER_SIZE)
        capacity = (len(buf) - offset - LOG_DESCRIPTOR_SIZE) // 8
        items_at = offset + LOG_DESCRIPTOR_SIZE
        blocks: list[int] = []
        escaped: list[int] = []
        if ld_type == LD_METADATA:
            if data1 > capacity:
                raise FormatError(f"log descriptor: {data1} metadata items exceed {capacity}")
            blocks = unpack_pointers(buf, items_at, data1)
        elif ld_type == LD_JDATA:
            if 2 * data1 > capacity:
                raise FormatError(f"log descriptor: {data1} jdata items exceed {capacity // 2}")
            pairs = unpack_pointers(buf, items_at, 2 * data1)
            blocks, escaped = pairs[0::2], pairs[1::2]
        elif ld_type == LD_REVOKE:
            blocks = unpack_pointers(buf, items_at, min(data1, capacity))
        return cls(ld_type, length, data1, data2, blocks, escaped)


def revoke_blocks_needed(bsize: int, count: int) -> int:
    """Journal blocks (descriptor + LB blocks) a revoke list of `count` entries takes."""
    first = (bsize - LOG_DESCRIPTOR_SIZE) // 8
    per_lb = (bsize - META_HEADER_SIZE) // 8
    return 1 + max(0, -(-(count - first) // per_lb))


def pack_revokes(bsize: int, blocks: list[int]) -> list[bytes]:
    """A REVOKE descriptor and its LB continuation blocks for `blocks`."""
    first = (bsize - LOG_DESCRIPTOR_SIZE) // 8
    per_lb = (bsize - META_HEADER_SIZE) // 8
    length = revoke_blocks_needed(bsize, len(blocks))
    descriptor = LogDescriptor(LD_REVOKE, length, len(blocks), 0, list(blocks[:first]))
    out = [descriptor.pack_block(bsize)]
    lb_header = MetaHeader.for_type(METATYPE_LB).pack()
    for pos in range(first, len(blocks), per_lb):
        chunk = pack_pointers(blocks[pos : pos + per_lb])
        out.append(pad_block(lb_header + chunk, bsize, "revoke continuation block"))
    return out


def unpack_revokes(blocks: list[Buffer]) -> list[int]:
    """Revoked block numbers from a REVOKE descriptor followed by its LB blocks.

    `blocks` must hold the descriptor and at least ld_length-1 following blocks.
    """
    if not blocks:
        raise FormatError("revoke list: no descriptor block")
    descriptor = LogDescriptor.unpack(blocks[0])
    if descriptor.ld_type != LD_REVOKE:
        raise FormatError(f"revoke list: descriptor type {descriptor.ld_type}, not REVOKE")
    if len(blocks) < descriptor.length:
        raise FormatError(
            f"revoke list: descriptor spans {descriptor.length} blocks, got {len(blocks)}"
        )
    revoked = list(descriptor.blocks)
    for index in range(1, descriptor.length):
        if len(revoked) >= descriptor.data1:
            break
        block = blocks[index]
        expect_header(block, 0, METATYPE_LB, "revoke continuation block")
        take = min(descriptor.data1 - len(revoked), (len(block) - META_HEADER_SIZE) // 8)
        revoked += unpack_pointers(block, META_HEADER_SIZE, take)
    if len(revoked) != descriptor.data1:
        raise FormatError(f"revoke list: found {len(revoked)} of {descriptor.data1} entries")
    return revoked


def escape_jdata(data: Buffer) -> tuple[bytes, int]:
    """Journal copy of a data block: if it starts with the magic, zero those 4 bytes
    so replay cannot mistake it for metadata, and report escaped = 1."""
    if has_magic(data):
        return b"\0\0\0\0" + bytes(memoryview(data)[4:]), 1
    return bytes(data), 0


def unescape_jdata(data: Buffer, escaped: int) -> bytes:
    """Undo escape_jdata when replaying a logged data block."""
    if escaped:
        return struct.pack(">I", GFS2_MAGIC) + bytes(memoryview(data)[4:])
    return bytes(data)
