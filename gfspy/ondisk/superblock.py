"""The superblock at byte 65536: format numbers, block size, the two root inodes,
the lock protocol and table, and the filesystem UUID.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass, field
from typing import ClassVar

from .constants import (
    FORMAT_FS,
    FORMAT_MULTI,
    METATYPE_SB,
    SB_OFFSET,
    SB_SIZE,
)
from .errors import FormatError
from .meta import Buffer, Inum, MetaHeader, expect_header, pad_block

# After the 24-byte header: fs_format, multihost_format, pad, bsize, bsize_shift, pad,
# master inum, pad inum, root inum, lockproto[64], locktable[64], 2 pad inums, uuid.
_BODY = struct.Struct(">II4xII4xQQ16xQQ64s64s32x16s")
_NAME_LEN = 64


def _decode_name(raw: bytes) -> str:
    """NUL-terminated ASCII field -> str (latin-1 so any byte round-trips)."""
    return raw.split(b"\0", 1)[0].decode("latin-1")


def _encode_name(text: str, what: str) -> bytes:
    try:
        raw = text.encode("latin-1")
    except UnicodeEncodeError as exc:
        raise FormatError(f"superblock: {what} {text!r} is not 8-bit text") from exc
    if len(raw) >= _NAME_LEN or b"\0" in raw:
        raise FormatError(f"superblock: {what} {text!r} must be under {_NAME_LEN} bytes")
    return raw


@dataclass(slots=True)
class Superblock:
    """gfs2_sb. `lockproto`/`locktable` are str (e.g. "lock_dlm", "cluster:fs")."""

    bsize: int
    bsize_shift: int
    master_dir: Inum
    root_dir: Inum
    lockproto: str = "lock_dlm"
    locktable: str = ""
    uuid: uuid.UUID = field(default_factory=lambda: uuid.UUID(int=0))
    fs_format: int = FORMAT_FS
    multihost_format: int = FORMAT_MULTI

    SIZE: ClassVar[int] = SB_SIZE
    OFFSET: ClassVar[int] = SB_OFFSET

    @property
    def sb_block(self) -> int:
        """Block number of the superblock for this block size."""
        return SB_OFFSET // self.bsize

    def pack(self) -> bytes:
        header = MetaHeader.for_type(METATYPE_SB).pack()
        return header + _BODY.pack(
            self.fs_format,
            self.multihost_format,
            self.bsize,
            self.bsize_shift,
            self.master_dir.formal,
            self.master_dir.addr,
            self.root_dir.formal,
            self.root_dir.addr,
            _encode_name(self.lockproto, "lockproto"),
            _encode_name(self.locktable, "locktable"),
            self.uuid.bytes,
        )

    def pack_into(self, buf: bytearray | memoryview, offset: int = 0) -> None:
        buf[offset : offset + SB_SIZE] = self.pack()

    def pack_block(self, bsize: int | None = None) -> bytes:
        """The whole superblock block (defaults to the superblock's own bsize)."""
        return pad_block(self.pack(), bsize or self.bsize, "superblock")

    @classmethod
    def unpack(cls, buf: Buffer, offset: int = 0) -> Superblock:
        """Decode and sanity-check: magic, type SB, a power-of-two bsize that agrees
        with bsize_shift. Format numbers are kept as read for the caller to judge."""
        expect_header(buf, offset, METATYPE_SB, "superblock")
        if len(buf) - offset < SB_SIZE:
            raise FormatError(f"superblock: need {SB_SIZE} bytes, buffer has {len(buf)}")
        (
            fs_format,
            multihost_format,
            bsize,
            bsize_shift,
            master_formal,
            master_addr,
            root_formal,
            root_addr,
            lockproto,
            locktable,
            raw_uuid,
        ) = _BODY.unpack_from(buf, offset + MetaHeader.SIZE)
        if bsize < 512 or bsize & (bsize - 1) or bsize > SB_OFFSET:
            raise FormatError(f"superblock: bad block size {bsize}")
        if 1 << bsize_shift != bsize:
            raise FormatError(f"superblock: bsize_shift {bsize_shift} disagrees with {bsize}")
        return cls(
            bsize=bsize,
            bsize_shift=bsize_shift,
            master_dir=Inum(master_formal, master_addr),
            root_dir=Inum(root_formal, root_addr),
            lockproto=_decode_name(lockproto),
            locktable=_decode_name(locktable),
            uuid=uuid.UUID(bytes=raw_uuid),
            fs_format=fs_format,
            multihost_format=multihost_format,
        )
