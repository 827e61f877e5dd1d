"""The dinode: the 232-byte inode structure at the start of every inode block.

The payload after it (stuffed data, dirents, hash table or block pointers) is decoded
by the modules that understand it; `Dinode.payload` only slices it out.
"""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass
from typing import ClassVar

from .constants import (
    DIF_EA_INDIRECT,
    DIF_EXHASH,
    DIF_JDATA,
    DIF_SYSTEM,
    DINODE_SIZE,
    METATYPE_DI,
)
from .errors import FormatError
from .meta import Buffer, Inum, MetaHeader, expect_header, need, pad_block

# After the header: formal, addr, mode, uid, gid, nlink, size, blocks, atime, mtime,
# ctime, major, minor, goal_meta, goal_data, generation, flags, payload_format,
# pad16, height, pad32, pad16, depth, entries, pad inum, eattr, 3 nsec, 44 reserved.
_BODY = struct.Struct(">QQIIIIQQqqqIIQQQII2xH4x2xHI16xQIII44x")


@dataclass(slots=True)
class Dinode:
    """gfs2_dinode. `addr` (no_addr) must equal the block the dinode lives in."""

    formal: int
    addr: int
    mode: int
    uid: int = 0
    gid: int = 0
    nlink: int = 1
    size: int = 0
    blocks: int = 1
    atime: int = 0
    mtime: int = 0
    ctime: int = 0
    major: int = 0
    minor: int = 0
    goal_meta: int = 0
    goal_data: int = 0
    generation: int = 0
    flags: int = 0
    payload_format: int = 0
    height: int = 0
    depth: int = 0
    entries: int = 0
    eattr: int = 0
    atime_nsec: int = 0
    mtime_nsec: int = 0
    ctime_nsec: int = 0

    SIZE: ClassVar[int] = DINODE_SIZE

    def pack(self) -> bytes:
        return MetaHeader.for_type(METATYPE_DI).pack() + _BODY.pack(
            self.formal,
            self.addr,
            self.mode,
            self.uid,
            self.gid,
            self.nlink,
            self.size,
            self.blocks,
            self.atime,
            self.mtime,
            self.ctime,
            self.major,
            self.minor,
            self.goal_meta,
            self.goal_data,
            self.generation,
            self.flags,
            self.payload_format,
            self.height,
            self.depth,
            self.entries,
            self.eattr,
            self.atime_nsec,
            self.mtime_nsec,
            self.ctime_nsec,
        )

    def pack_into(self, buf: bytearray | memoryview, offset: int = 0) -> None:
        """Write the 232 struct bytes at `offset`, leaving the payload alone."""
        buf[offset : offset + DINODE_SIZE] = self.pack()

    def pack_block(self, bsize: int, payload: Buffer = b"") -> bytes:
        """The dinode block: struct, then `payload` (at offset 232), zero padded."""
        return pad_block(self.pack() + bytes(payload), bsize, "dinode block")

    @classmethod
    def unpack(cls, buf: Buffer, offset: int = 0) -> Dinode:
        expect_header(buf, offset, METATYPE_DI, "dinode")
        need(buf, offset, cls.SIZE, "dinode")
        return cls(*_BODY.unpack_from(buf, offset + MetaHeader.SIZE))

    @staticmethod
    def payload(block: Buffer, bsize: int | None = None) -> memoryview:
        """The bytes after the struct (stuffed data, dirents or pointers)."""
        end = len(block) if bsize is None else bsize
        if end < DINODE_SIZE:
            raise FormatError(f"dinode block: {end} bytes is shorter than a dinode")
        return memoryview(block)[DINODE_SIZE:end]

    @property
    def inum(self) -> Inum:
        return Inum(self.formal, self.addr)

    @property
    def file_type(self) -> int:
        """The S_IFMT bits of the mode."""
        return stat.S_IFMT(self.mode)

    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    def is_lnk(self) -> bool:
        return stat.S_ISLNK(self.mode)

    def is_chr(self) -> bool:
        return stat.S_ISCHR(self.mode)

    def is_blk(self) -> bool:
        return stat.S_ISBLK(self.mode)

    def is_fifo(self) -> bool:
        return stat.S_ISFIFO(self.mode)

    def is_sock(self) -> bool:
        return stat.S_ISSOCK(self.mode)

    def is_stuffed(self) -> bool:
        """Data lives inside the dinode block (height 0)."""
        return self.height == 0

    def is_exhash(self) -> bool:
        return bool(self.flags & DIF_EXHASH)

    def is_jdata(self) -> bool:
        return bool(self.flags & DIF_JDATA)

    def is_system(self) -> bool:
        return bool(self.flags & DIF_SYSTEM)

    def has_ea_indirect(self) -> bool:
        return bool(self.flags & DIF_EA_INDIRECT)

    def has_valid_type(self) -> bool:
        """True if the mode names one of the seven POSIX file types."""
        return self.file_type in (
            stat.S_IFDIR,
            stat.S_IFREG,
            stat.S_IFLNK,
            stat.S_IFCHR,
            stat.S_IFBLK,
            stat.S_IFIFO,
            stat.S_IFSOCK,
        )
