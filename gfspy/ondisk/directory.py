"""Directory structures: dirents, leaf blocks, the exhash table and JD blocks.

Dirents tile an area (the stuffed dinode payload or a leaf after its header): each
rec_len leads to the next and the last one ends exactly at the end of the area. The
decoder checks that tiling, because a broken chain is the one thing a reader cannot
work around.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

from .checksums import name_hash
from .constants import (
    DINODE_SIZE,
    DIRENT_HEADER_SIZE,
    DT_DIR,
    FORMAT_DE,
    LEAF_HEADER_SIZE,
    META_HEADER_SIZE,
    METATYPE_JD,
    METATYPE_LF,
    NAME_MAX,
)
from .errors import FormatError
from .indirect import pack_pointers, unpack_pointers
from .meta import Buffer, Inum, MetaHeader, expect_header, need, pad_block

# formal, addr, hash, rec_len, name_len, type, rahead, 12 pad bytes (cookie junk)
_DIRENT = struct.Struct(">QQIHHHH12x")
# depth, entries, dirent_format, next, inode, dist, nsec, sec, 40 reserved
_LEAF_BODY = struct.Struct(">HHIQQIIQ40x")


def dirent_size(name_len: int) -> int:
    """Bytes a dirent with a `name_len`-byte name needs: header + name, 8-aligned."""
    return (DIRENT_HEADER_SIZE + name_len + 7) & ~7


@dataclass(slots=True)
class Dirent:
    """gfs2_dirent header plus its name. A zero inum marks an unused "sentinel"."""

    inum: Inum
    hash: int
    rec_len: int
    name_len: int
    type: int
    rahead: int = 0
    name: bytes = b""

    HEADER_SIZE: ClassVar[int] = DIRENT_HEADER_SIZE

    @classmethod
    def make(cls, name: bytes, inum: Inum, dtype: int, rahead: int = 0) -> Dirent:
        """A live dirent with the hash computed and the minimum rec_len."""
        if not 1 <= len(name) <= NAME_MAX:
            raise FormatError(f"dirent: name length {len(name)} is not 1..{NAME_MAX}")
        return cls(inum, name_hash(name), dirent_size(len(name)), len(name), dtype, rahead, name)

    @classmethod
    def sentinel(cls, rec_len: int) -> Dirent:
        """The unused placeholder that fills an empty leaf (or an emptied first slot)."""
        return cls(Inum(0, 0), 0, rec_len, 0, 0, 0, b"")

    def is_sentinel(self) -> bool:
        return self.inum.addr == 0 or self.inum.formal == 0

    @property
    def size(self) -> int:
        """Bytes this dirent needs; rec_len beyond that is free slack."""
        return dirent_size(self.name_len)

    def pack(self) -> bytes:
        """Header (pad bytes zero) followed by the name; rec_len slack not included."""
        return self._header() + self.name

    def _header(self) -> bytes:
        return _DIRENT.pack(
            self.inum.formal,
            self.inum.addr,
            self.hash,
            self.rec_len,
            self.name_len,
            self.type,
            self.rahead,
        )

    def pack_into(self, buf: bytearray | memoryview, offset: int) -> None:
        """Write header and name at `offset`; bytes after the name are left alone."""
        raw = self.pack()
        buf[offset : offset + len(raw)] = raw

    @classmethod
    def unpack(cls, buf: Buffer, offset: int = 0) -> Dirent:
        need(buf, offset, DIRENT_HEADER_SIZE, "dirent")
        formal, addr, dhash, rec_len, name_len, dtype, rahead = _DIRENT.unpack_from(buf, offset)
        start = offset + DIRENT_HEADER_SIZE
        need(buf, start, name_len, "dirent name")
        name = bytes(buf[start : start + name_len])
        return cls(Inum(formal, addr), dhash, rec_len, name_len, dtype, rahead, name)


def iter_dirents(block: Buffer, start: int, end: int) -> Iterator[tuple[int, Dirent]]:
    """Yield (offset, dirent) for every dirent tiling block[start:end], sentinels
    included. FormatError if a rec_len is too small, runs past `end`, or the chain
    does not finish exactly at `end`."""
    if end > len(block) or start > end:
        raise FormatError(f"dirents: area {start}..{end} outside a {len(block)}-byte buffer")
    offset = start
    while offset < end:
        if end - offset < DIRENT_HEADER_SIZE:
            raise FormatError(f"dirent at {offset}: {end - offset} bytes left, chain broken")
        rec_len, name_len = struct.unpack_from(">HH", block, offset + 20)
        if rec_len < DIRENT_HEADER_SIZE:
            raise FormatError(f"dirent at {offset}: rec_len {rec_len} too small")
        if offset + rec_len > end:
            raise FormatError(f"dirent at {offset}: rec_len {rec_len} runs past {end}")
        if name_len > NAME_MAX or DIRENT_HEADER_SIZE + name_len > rec_len:
            raise FormatError(
                f"dirent at {offset}: name_len {name_len} does not fit rec_len {rec_len}"
            )
        yield offset, Dirent.unpack(block, offset)
        offset += rec_len


def live_dirents(block: Buffer, start: int, end: int) -> Iterator[tuple[int, Dirent]]:
    """Like iter_dirents but without sentinels: the entries that name an inode."""
    for offset, dirent in iter_dirents(block, start, end):
        if not dirent.is_sentinel():
            yield offset, dirent


def pack_dirents(dirents: list[Dirent], area_size: int) -> bytearray:
    """Lay `dirents` out back to back in a fresh area, fixing their rec_len: each
    gets its minimum size and the last one runs to the end of the area."""
    area = bytearray(area_size)
    if not dirents:
        Dirent.sentinel(area_size).pack_into(area, 0)
        return area
    offset = 0
    for index, dirent in enumerate(dirents):
        size = dirent.size
        if offset + size > area_size:
            raise FormatError(f"dirents: {len(dirents)} entries do not fit {area_size} bytes")
        dirent.rec_len = area_size - offset if index == len(dirents) - 1 else size
        dirent.pack_into(area, offset)
        offset += size
    return area


def add_dirent(block: bytearray | memoryview, start: int, end: int, dirent: Dirent) -> int | None:
    """Insert `dirent` into the tiled area block[start:end]; returns its offset, or
    None if no record has enough slack.

    An unused first record (sentinel) is reused in place with its rec_len; otherwise
    the first record with enough slack is cut down to its own size and the new entry
    takes the remainder. `dirent.rec_len` is set to the record length it received.
    """
    needed = dirent.size
    for offset, existing in iter_dirents(block, start, end):
        if existing.is_sentinel():
            if existing.rec_len >= needed:
                dirent.rec_len = existing.rec_len
                dirent.pack_into(block, offset)
                return offset
            continue
        slack = existing.rec_len - existing.size
        if slack >= needed:
            struct.pack_into(">H", block, offset + 20, existing.size)
            new_offset = offset + existing.size
            dirent.rec_len = slack
            dirent.pack_into(block, new_offset)
            return new_offset
    return None


def remove_dirent(block: bytearray | memoryview, start: int, end: int, offset: int) -> None:
    """Delete the live dirent at `offset` from the area block[start:end].

    Its space joins the previous record's slack; the first record of an area has no
    previous one, so it becomes a sentinel (zero inum) that keeps its rec_len.
    """
    previous = None
    for here, existing in iter_dirents(block, start, end):
        if here == offset:
            if existing.is_sentinel():
                raise FormatError(f"dirent at {offset} is already unused")
            if previous is None:
                sentinel = Dirent.sentinel(existing.rec_len)
                block[offset : offset + existing.size] = bytes(existing.size)
                sentinel.pack_into(block, offset)
            else:
                prev_offset, prev = previous
                struct.pack_into(">H", block, prev_offset + 20, prev.rec_len + existing.rec_len)
            return
        previous = (here, existing)
    raise FormatError(f"no dirent starts at offset {offset}")


def new_stuffed_dir_payload(bsize: int, self_inum: Inum, parent_inum: Inum) -> bytes:
    """The payload of a fresh linear directory: "." then ".." filling the rest."""
    dot = Dirent.make(b".", self_inum, DT_DIR)
    dotdot = Dirent.make(b"..", parent_inum, DT_DIR)
    return bytes(pack_dirents([dot, dotdot], bsize - DINODE_SIZE))


@dataclass(slots=True)
class Leaf:
    """The 104-byte header of a directory leaf block; dirents follow it."""

    depth: int = 0
    entries: int = 0
    dirent_format: int = FORMAT_DE
    next: int = 0
    inode: int = 0
    dist: int = 1
    nsec: int = 0
    sec: int = 0

    SIZE: ClassVar[int] = LEAF_HEADER_SIZE

    def pack(self) -> bytes:
        return MetaHeader.for_type(METATYPE_LF).pack() + _LEAF_BODY.pack(
            self.depth,
            self.entries,
            self.dirent_format,
            self.next,
            self.inode,
            self.dist,
            self.nsec,
            self.sec,
        )

    def pack_into(self, buf: bytearray | memoryview, offset: int = 0) -> None:
        """Write the 104 header bytes at `offset`, leaving the dirents alone."""
        buf[offset : offset + LEAF_HEADER_SIZE] = self.pack()

    def pack_block(self, bsize: int, dirents: Buffer | None = None) -> bytes:
        """The leaf block: header then the dirent area (a sentinel if none given)."""
        area = pack_dirents([], bsize - LEAF_HEADER_SIZE) if dirents is None else dirents
        return pad_block(self.pack() + bytes(area), bsize, "leaf block")

    @classmethod
    def unpack(cls, buf: Buffer, offset: int = 0) -> Leaf:
        expect_header(buf, offset, METATYPE_LF, "leaf block")
        need(buf, offset, cls.SIZE, "leaf block")
        return cls(*_LEAF_BODY.unpack_from(buf, offset + META_HEADER_SIZE))


def hash_index(dhash: int, depth: int) -> int:
    """Hash-table slot of a name hash in a table of 2**depth pointers (top bits)."""
    return dhash >> (32 - depth) if depth else 0


def pack_hash_table(ptrs: list[int] | tuple[int, ...]) -> bytes:
    """The exhash table as stored in the directory's data (2**depth u64 leaf blocks)."""
    return pack_pointers(ptrs)


def unpack_hash_table(data: Buffer, depth: int) -> list[int]:
    """Leaf block numbers of a table of 2**depth slots from the directory's data."""
    if depth < 0 or depth > 32:
        raise FormatError(f"hash table: bad depth {depth}")
    return unpack_pointers(data, 0, 1 << depth)


def pack_jd_block(bsize: int, payload: Buffer) -> bytes:
    """A JD block (unstuffed directory data, i.e. the hash table): header + payload."""
    return pad_block(MetaHeader.for_type(METATYPE_JD).pack() + bytes(payload), bsize, "JD block")


def jd_payload(block: Buffer, bsize: int | None = None) -> memoryview:
    """The jbsize payload bytes of a JD block (type checked)."""
    expect_header(block, 0, METATYPE_JD, "JD block")
    end = len(block) if bsize is None else bsize
    return memoryview(block)[META_HEADER_SIZE:end]
