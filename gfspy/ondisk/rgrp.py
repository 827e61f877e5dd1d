"""Resource groups: rindex entries, RG/RB headers and the two-bit allocation bitmaps.

The bitmap helpers work on the *concatenated* bitmap of one rgrp (RG payload followed
by every RB payload) so the allocator and fsck index blocks without caring which
bitmap block a bit lives in; `extract_bitmap`/`split_bitmap` convert at the edges.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import ClassVar

from .checksums import rg_crc
from .constants import (
    BLKST_DINODE,
    META_HEADER_SIZE,
    METATYPE_RB,
    METATYPE_RG,
    RG_HEADER_SIZE,
    RINDEX_ENTRY_SIZE,
)
from .errors import FormatError
from .meta import Buffer, MetaHeader, expect_header, need, pad_block

# addr, length, pad (garbage from mkfs), data0, data, bitbytes, 64 reserved (garbage)
_RINDEX = struct.Struct(">QI4xQII64x")
# flags, free, dinodes, skip, igeneration, data0, data, bitbytes, crc, 60 reserved
_RG_BODY = struct.Struct(">IIIIQQIII60x")
_RG_CRC_OFFSET = 64


@dataclass(slots=True)
class RindexEntry:
    """One 96-byte entry of the rindex file: where an rgrp is and how big."""

    addr: int
    length: int
    data0: int
    data: int
    bitbytes: int

    SIZE: ClassVar[int] = RINDEX_ENTRY_SIZE

    def pack(self) -> bytes:
        """Pad and reserved bytes are written as zeros (mkfs leaves garbage there)."""
        return _RINDEX.pack(self.addr, self.length, self.data0, self.data, self.bitbytes)

    def pack_into(self, buf: bytearray | memoryview, offset: int = 0) -> None:
        buf[offset : offset + RINDEX_ENTRY_SIZE] = self.pack()

    @classmethod
    def unpack(cls, buf: Buffer, offset: int = 0) -> RindexEntry:
        need(buf, offset, cls.SIZE, "rindex entry")
        return cls(*_RINDEX.unpack_from(buf, offset))

    @property
    def end(self) -> int:
        """First block after this rgrp's data blocks."""
        return self.data0 + self.data

    def contains(self, block: int) -> bool:
        """True if `block` is one of the data blocks this rgrp's bitmap describes."""
        return self.data0 <= block < self.data0 + self.data


def unpack_rindex(data: Buffer) -> list[RindexEntry]:
    """Decode the whole rindex file; its size must be a multiple of 96."""
    if len(data) % RINDEX_ENTRY_SIZE:
        raise FormatError(f"rindex: size {len(data)} is not a multiple of {RINDEX_ENTRY_SIZE}")
    return [RindexEntry.unpack(data, off) for off in range(0, len(data), RINDEX_ENTRY_SIZE)]


def pack_rindex(entries: list[RindexEntry]) -> bytes:
    return b"".join(entry.pack() for entry in entries)


@dataclass(slots=True)
class RgrpHeader:
    """The 128-byte RG header. `crc` is as read; `pack` always recomputes it."""

    flags: int = 0
    free: int = 0
    dinodes: int = 0
    skip: int = 0
    igeneration: int = 0
    data0: int = 0
    data: int = 0
    bitbytes: int = 0
    crc: int = field(default=0, compare=False)
    crc_ok: bool = field(default=True, compare=False)

    SIZE: ClassVar[int] = RG_HEADER_SIZE

    def pack(self) -> bytes:
        """The 128 header bytes with a freshly computed rg_crc (reserved bytes zero)."""
        raw = bytearray(MetaHeader.for_type(METATYPE_RG).pack())
        raw += _RG_BODY.pack(
            self.flags,
            self.free,
            self.dinodes,
            self.skip,
            self.igeneration,
            self.data0,
            self.data,
            self.bitbytes,
            0,
        )
        crc = rg_crc(raw)
        struct.pack_into(">I", raw, _RG_CRC_OFFSET, crc)
        self.crc = crc
        self.crc_ok = True
        return bytes(raw)

    def pack_into(self, buf: bytearray | memoryview, offset: int = 0) -> None:
        """Write the 128 header bytes (crc computed) at `offset`; bitmap untouched."""
        buf[offset : offset + RG_HEADER_SIZE] = self.pack()

    def pack_block(self, bsize: int, bitmap: Buffer = b"") -> bytes:
        """The RG block: header then the first `bsize - 128` bitmap bytes."""
        return pad_block(self.pack() + bytes(bitmap), bsize, "rgrp header block")

    @classmethod
    def unpack(cls, buf: Buffer, offset: int = 0) -> RgrpHeader:
        """Decode; `crc_ok` is False when a non-zero stored rg_crc does not match."""
        expect_header(buf, offset, METATYPE_RG, "rgrp header")
        need(buf, offset, cls.SIZE, "rgrp header")
        fields = _RG_BODY.unpack_from(buf, offset + META_HEADER_SIZE)
        header = cls(*fields)
        header.crc_ok = cls.verify_crc(buf, offset)
        return header

    @staticmethod
    def verify_crc(buf: Buffer, offset: int = 0) -> bool:
        """True if the stored rg_crc is absent (0) or matches the header bytes."""
        need(buf, offset, RG_HEADER_SIZE, "rgrp header")
        stored = struct.unpack_from(">I", buf, offset + _RG_CRC_OFFSET)[0]
        if stored == 0:
            return True
        return stored == rg_crc(memoryview(buf)[offset : offset + RG_HEADER_SIZE])

    def matches(self, entry: RindexEntry) -> bool:
        """True if the copies of data0/data/bitbytes agree with the rindex entry."""
        return (self.data0, self.data, self.bitbytes) == (
            entry.data0,
            entry.data,
            entry.bitbytes,
        )


@dataclass(slots=True)
class RgrpBitmapHeader:
    """Header of an RB block (a bitmap block after the RG block): type RB only."""

    SIZE: ClassVar[int] = META_HEADER_SIZE

    def pack(self) -> bytes:
        return MetaHeader.for_type(METATYPE_RB).pack()

    def pack_block(self, bsize: int, bitmap: Buffer = b"") -> bytes:
        return pad_block(self.pack() + bytes(bitmap), bsize, "rgrp bitmap block")

    @classmethod
    def unpack(cls, buf: Buffer, offset: int = 0) -> RgrpBitmapHeader:
        expect_header(buf, offset, METATYPE_RB, "rgrp bitmap block")
        return cls()


# ---------------------------------------------------------------------------------
# Bitmaps: 2 bits per data block, 4 blocks per byte, least-significant bits first.


def bitmap_capacity(bsize: int, length: int) -> int:
    """Data blocks an rgrp with `length` header+bitmap blocks can describe."""
    if length < 1:
        return 0
    return 4 * ((bsize - RG_HEADER_SIZE) + (length - 1) * (bsize - META_HEADER_SIZE))


def bitmap_blocks_needed(bsize: int, data_blocks: int) -> int:
    """Smallest number of RG+RB blocks whose bitmaps cover `data_blocks` blocks."""
    first = 4 * (bsize - RG_HEADER_SIZE)
    if data_blocks <= first:
        return 1
    per_rb = 4 * (bsize - META_HEADER_SIZE)
    return 1 + -(-(data_blocks - first) // per_rb)


def bitmap_payload_sizes(bsize: int, length: int) -> list[int]:
    """Bitmap bytes carried by each of the `length` blocks of an rgrp header."""
    return [bsize - RG_HEADER_SIZE] + [bsize - META_HEADER_SIZE] * (length - 1)


def get_state(bitmap: Buffer, n: int) -> int:
    """State of data block `n` (counted from ri_data0)."""
    return (bitmap[n >> 2] >> ((n & 3) << 1)) & 3


def set_state(bitmap: bytearray | memoryview, n: int, state: int) -> None:
    """Set data block `n` to `state` (FREE/USED/UNLINKED/DINODE)."""
    if not 0 <= state <= 3:
        raise ValueError(f"bad block state {state}")
    shift = (n & 3) << 1
    index = n >> 2
    bitmap[index] = (bitmap[index] & ~(3 << shift) & 0xFF) | (state << shift)


_EVEN_BITS_CACHE: dict[int, int] = {}


def _even_bits(nbits: int) -> int:
    """Integer with every even bit below `nbits` set (the low bit of each state)."""
    mask = _EVEN_BITS_CACHE.get(nbits)
    if mask is None:
        mask = int.from_bytes(b"\x55" * ((nbits + 7) // 8), "little") & ((1 << nbits) - 1)
        if len(_EVEN_BITS_CACHE) < 64:
            _EVEN_BITS_CACHE[nbits] = mask
    return mask


def count_states(bitmap: Buffer, ndata: int) -> tuple[int, int, int, int]:
    """(free, used, unlinked, dinode) counts over the first `ndata` blocks.

    Reads the bitmap as one little-endian integer so block n is bits 2n..2n+1, then
    counts with bit masks and int.bit_count: no per-block Python loop.
    """
    if ndata < 0 or (ndata + 3) // 4 > len(bitmap):
        raise FormatError(f"bitmap: {len(bitmap)} bytes cannot describe {ndata} blocks")
    if ndata == 0:
        return (0, 0, 0, 0)
    nbits = 2 * ndata
    value = int.from_bytes(memoryview(bitmap)[: (ndata + 3) // 4], "little")
    value &= (1 << nbits) - 1
    evens = _even_bits(nbits)
    low = value & evens
    high = (value >> 1) & evens
    dinode = (low & high).bit_count()
    used = low.bit_count() - dinode
    unlinked = high.bit_count() - dinode
    free = ndata - used - unlinked - dinode
    return (free, used, unlinked, dinode)


def extract_bitmap(blocks: list[Buffer], bsize: int, bitbytes: int) -> bytearray:
    """Concatenate the bitmap payloads of an rgrp's RG and RB blocks (in order),
    truncated to `bitbytes`. Headers are not checked here; decode them separately."""
    if not blocks:
        raise FormatError("bitmap: an rgrp has at least its RG block")
    out = bytearray()
    for index, block in enumerate(blocks):
        if len(block) < bsize:
            raise FormatError(f"bitmap block {index}: {len(block)} bytes, expected {bsize}")
        start = RG_HEADER_SIZE if index == 0 else META_HEADER_SIZE
        out += memoryview(block)[start:bsize]
    if len(out) < bitbytes:
        raise FormatError(f"bitmap: {len(blocks)} blocks hold {len(out)} bytes < {bitbytes}")
    del out[bitbytes:]
    return out


def split_bitmap(bitmap: Buffer, bsize: int, length: int) -> list[bytes]:
    """Cut a concatenated bitmap into the payload of each of `length` blocks, each
    zero-padded to its full size (bsize-128 for the RG block, bsize-24 for RB)."""
    sizes = bitmap_payload_sizes(bsize, length)
    if len(bitmap) > sum(sizes):
        raise FormatError(f"bitmap: {len(bitmap)} bytes do not fit {length} blocks")
    parts = []
    pos = 0
    for size in sizes:
        chunk = bytes(bitmap[pos : pos + size])
        parts.append(chunk + bytes(size - len(chunk)))
        pos += size
    return parts


def pack_rgrp_blocks(header: RgrpHeader, bitmap: Buffer, bsize: int, length: int) -> list[bytes]:
    """Every header block of an rgrp (RG then RB...), checksummed and padded."""
    parts = split_bitmap(bitmap, bsize, length)
    blocks = [header.pack_block(bsize, parts[0])]
    rb = RgrpBitmapHeader()
    blocks.extend(rb.pack_block(bsize, part) for part in parts[1:])
    return blocks


def find_state(bitmap: Buffer, state: int, start: int, ndata: int) -> int | None:
    """First block n in [start, ndata) whose state is `state`, or None.

    Scans whole bytes with bytes.find on a precomputed set of matching byte values,
    so allocation does not loop per block in Python.
    """
    n = start
    view = bytes(bitmap)
    while n < ndata and n & 3:
        if get_state(view, n) == state:
            return n
        n += 1
    if n >= ndata:
        return None
    last = (ndata + 3) >> 2
    # Map each byte holding at least one block in `state` to 1, the rest to 0.
    flags = view[:last].translate(_BYTES_WITH_STATE[state])
    index = n >> 2
    while index < last:
        hit = flags.find(b"\x01", index)
        if hit < 0:
            return None
        for block in range(hit * 4, min(hit * 4 + 4, ndata)):
            if get_state(view, block) == state:
                return block
        index = hit + 1
    return None


def _byte_table(state: int) -> bytes:
    return bytes(
        1 if any(((value >> (2 * k)) & 3) == state for k in range(4)) else 0 for value in range(256)
    )


_BYTES_WITH_STATE = tuple(_byte_table(state) for state in range(BLKST_DINODE + 1))
