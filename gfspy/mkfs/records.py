"""Byte layouts mkfs writes that gfspy.ondisk does not (yet) encode.

Only encoders, and only the fields mkfs sets: dinodes, rgrp headers, rindex entries,
directory entries, leaf headers and log headers. Layouts follow reference/gfs2-format.md
§2-§4 and §7.1; checksums come from gfspy.ondisk.checksums so there is one recipe.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from gfspy.ondisk.checksums import rg_crc
from gfspy.ondisk.constants import (
    DINODE_SIZE,
    DIRENT_HEADER_SIZE,
    FORMAT_DE,
    METATYPE_DI,
    METATYPE_IN,
    METATYPE_JD,
    METATYPE_LF,
    METATYPE_RG,
    RG_HEADER_SIZE,
)
from gfspy.ondisk.meta import MetaHeader

# Everything after the 24-byte header, up to di_eattr and the nsec fields (offset 24..188).
_DINODE_BODY = struct.Struct(">QQIIIIQQqqqIIQQQII2xH4x2xHI16xQIII")
_RG_BODY = struct.Struct(
    ">IIIIQQII"
)  # flags, free, dinodes, skip, igeneration, data0, data, bitbytes
_RINDEX = struct.Struct(">QI4xQII64x")
_DIRENT = struct.Struct(">QQIHHH")  # inum, hash, rec_len, name_len, type (rahead/pad stay 0)
_LEAF_BODY = struct.Struct(
    ">HHIQQIIQ"
)  # depth, entries, dirent_format, next, inode, dist, nsec, sec

RINDEX_ENTRY = _RINDEX.size


def dirent_size(name_len: int) -> int:
    """Bytes a dirent with a `name_len`-byte name needs (header + name, 8-aligned)."""
    return (DIRENT_HEADER_SIZE + name_len + 7) & ~7


@dataclass(slots=True)
class DinodeFields:
    """The dinode fields mkfs sets; everything else is written as zero."""

    formal: int
    addr: int
    mode: int
    nlink: int = 1
    size: int = 0
    blocks: int = 1
    time: int = 0
    goal_meta: int = 0
    goal_data: int = 0
    flags: int = 0
    payload_format: int = 0
    height: int = 0
    depth: int = 0
    entries: int = 0


def pack_dinode_into(buf: bytearray | memoryview, offset: int, d: DinodeFields) -> None:
    """Write the 232-byte dinode header at `offset` (the payload is the caller's)."""
    MetaHeader.for_type(METATYPE_DI).pack_into(buf, offset)
    _DINODE_BODY.pack_into(
        buf,
        offset + MetaHeader.SIZE,
        d.formal,
        d.addr,
        d.mode,
        0,  # uid
        0,  # gid
        d.nlink,
        d.size,
        d.blocks,
        d.time,
        d.time,
        d.time,
        0,  # major
        0,  # minor
        d.goal_meta,
        d.goal_data,
        0,  # generation
        d.flags,
        d.payload_format,
        d.height,
        d.depth,
        d.entries,
        0,  # eattr
        0,  # atime nsec
        0,  # mtime nsec
        0,  # ctime nsec
    )


assert MetaHeader.SIZE + _DINODE_BODY.size <= DINODE_SIZE


def pack_rgrp_header_into(
    buf: bytearray | memoryview,
    offset: int,
    *,
    free: int,
    dinodes: int,
    skip: int,
    data0: int,
    data: int,
) -> None:
    """Write an RG header (first 128 bytes of the rgrp's first block) with its CRC."""
    MetaHeader.for_type(METATYPE_RG).pack_into(buf, offset)
    _RG_BODY.pack_into(
        buf, offset + MetaHeader.SIZE, 0, free, dinodes, skip, 0, data0, data, data // 4
    )
    view = memoryview(buf)[offset : offset + RG_HEADER_SIZE]
    view[64:RG_HEADER_SIZE] = bytes(RG_HEADER_SIZE - 64)
    struct.pack_into(">I", view, 64, rg_crc(view))


def pack_rindex_entry(addr: int, length: int, data0: int, data: int) -> bytes:
    """One 96-byte rindex entry; the pad and reserved bytes are zero (mkfs leaves junk)."""
    return _RINDEX.pack(addr, length, data0, data, data // 4)


def pack_dirent_into(
    buf: bytearray | memoryview,
    offset: int,
    *,
    formal: int,
    addr: int,
    name_hash: int,
    rec_len: int,
    name: bytes,
    de_type: int,
) -> None:
    _DIRENT.pack_into(buf, offset, formal, addr, name_hash, rec_len, len(name), de_type)
    start = offset + DIRENT_HEADER_SIZE
    buf[start : start + len(name)] = name


def pack_leaf_header_into(
    buf: bytearray | memoryview, offset: int, *, depth: int, entries: int, owner: int
) -> None:
    """Leaf header as mkfs.gfs2 writes it: no chain, lf_dist 0 (unknown), no timestamp."""
    MetaHeader.for_type(METATYPE_LF).pack_into(buf, offset)
    _LEAF_BODY.pack_into(
        buf, offset + MetaHeader.SIZE, depth, entries, FORMAT_DE, 0, owner, 0, 0, 0
    )


def pack_indirect_block(pointers: list[int]) -> bytes:
    """An IN block: header then big-endian block pointers (the list fills the block)."""
    header = MetaHeader.for_type(METATYPE_IN).pack()
    return header + b"".join(p.to_bytes(8, "big") for p in pointers)


def pack_jd_block(bsize: int, payload: bytes) -> bytes:
    """A directory data block (here: a piece of the hash table) with its JD header."""
    header = MetaHeader.for_type(METATYPE_JD).pack()
    return header + payload + bytes(bsize - len(header) - len(payload))
