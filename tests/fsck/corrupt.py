"""Single-field corruptions of a fresh mkfs.gfs2 image, for the checker's tests.

Each helper changes exactly one on-disk field (keeping checksums that cover it valid,
unless the checksum is the fault) and returns the block it touched, so a test can
insist that the checker names that block. Decoding uses gfspy.ondisk only, never the
checker under test.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

from gfspy.ondisk.constants import (
    DINODE_SIZE,
    LH_UNMOUNT,
    META_HEADER_SIZE,
    RG_HEADER_SIZE,
    SB_OFFSET,
    Geometry,
)
from gfspy.ondisk.dinode import Dinode
from gfspy.ondisk.directory import iter_dirents
from gfspy.ondisk.indirect import unpack_pointers
from gfspy.ondisk.journal import LogHeader
from gfspy.ondisk.meta import peek_type
from gfspy.ondisk.rgrp import RgrpHeader, RindexEntry, get_state, set_state, unpack_rindex
from gfspy.ondisk.superblock import Superblock

SEEK_DATA = getattr(os, "SEEK_DATA", 3)
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)


def image_digest(path: Path) -> str:
    """SHA-256 over the file size and every data extent (offset and bytes).

    Walking only the allocated extents keeps a 1 TiB sparse image cheap to hash; any
    write, even of zeros into a hole, allocates an extent and changes the digest.
    """
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        fd = f.fileno()
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            end = os.lseek(fd, start, SEEK_HOLE)
            h.update(f"@{start}".encode())
            f.seek(start)
            left = end - start
            while left:
                chunk = f.read(min(left, 8 << 20))
                h.update(chunk)
                left -= len(chunk)
            pos = end
    return h.hexdigest()


class Image:
    """Block-level access to a GFS2 image file made by mkfs.gfs2."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            f.seek(SB_OFFSET)
            self.sb = Superblock.unpack(f.read(4096))
        self.bsize = self.sb.bsize
        self.geo = Geometry.for_bsize(self.bsize)

    def read(self, block: int) -> bytearray:
        with open(self.path, "rb") as f:
            f.seek(block * self.bsize)
            return bytearray(f.read(self.bsize))

    def write(self, block: int, data: bytes | bytearray) -> None:
        assert len(data) == self.bsize
        with open(self.path, "r+b") as f:
            f.seek(block * self.bsize)
            f.write(data)

    # -- reading structures --------------------------------------------------------

    def data_blocks(self, addr: int) -> list[int]:
        """A file's data blocks in logical order (mkfs files have no holes)."""
        block = self.read(addr)
        di = Dinode.unpack(block)
        if di.height == 0:
            return []
        ptrs = [p for p in unpack_pointers(block, DINODE_SIZE, self.geo.diptrs) if p]
        for _ in range(di.height - 1):
            nxt = []
            for p in ptrs:
                nxt += [q for q in unpack_pointers(self.read(p), 24, self.geo.inptrs) if q]
            ptrs = nxt
        return ptrs

    def file_bytes(self, addr: int) -> bytes:
        block = self.read(addr)
        di = Dinode.unpack(block)
        if di.height == 0:
            return bytes(block[DINODE_SIZE : DINODE_SIZE + di.size])
        return b"".join(bytes(self.read(b)) for b in self.data_blocks(addr))[: di.size]

    def entries(self, dir_addr: int) -> dict[bytes, tuple[int, int]]:
        """name -> (target block, dirent offset) of a linear directory."""
        block = self.read(dir_addr)
        return {
            d.name: (d.inum.addr, off)
            for off, d in iter_dirents(block, DINODE_SIZE, self.bsize)
            if not d.is_sentinel()
        }

    def system(self, name: str) -> int:
        """Block of a system file: master entries, then jindex and per_node entries."""
        master = self.entries(self.sb.master_dir.addr)
        key = name.encode()
        if key in master:
            return master[key][0]
        for sub in (b"jindex", b"per_node"):
            found = self.entries(master[sub][0])
            if key in found:
                return found[key][0]
        raise KeyError(name)

    def rindex(self) -> list[RindexEntry]:
        return unpack_rindex(self.file_bytes(self.system("rindex")))

    # -- corruptions ---------------------------------------------------------------

    def add_rg_free(self, rgrp_index: int, delta: int) -> int:
        """rg_free += delta in one rgrp header, rg_crc recomputed; returns its block."""
        addr = self.rindex()[rgrp_index].addr
        block = self.read(addr)
        header = RgrpHeader.unpack(block)
        header.free += delta
        block[:RG_HEADER_SIZE] = header.pack()
        self.write(addr, block)
        return addr

    def _bitmap(self, entry: RindexEntry) -> tuple[list[bytearray], bytearray]:
        raw = [self.read(entry.addr + k) for k in range(entry.length)]
        spans = [(0, RG_HEADER_SIZE)] + [(k, META_HEADER_SIZE) for k in range(1, entry.length)]
        bitmap = bytearray(b"".join(bytes(raw[k][off:]) for k, off in spans))
        return raw, bitmap

    def _store_state(
        self, entry: RindexEntry, raw: list[bytearray], bitmap: bytearray, n: int
    ) -> None:
        byte = n // 4
        first = self.bsize - RG_HEADER_SIZE
        if byte < first:
            k, off = 0, RG_HEADER_SIZE + byte
        else:
            k, rest = divmod(byte - first, self.bsize - META_HEADER_SIZE)
            k, off = k + 1, META_HEADER_SIZE + rest
        raw[k][off] = bitmap[byte]
        self.write(entry.addr + k, raw[k])

    def set_block_state(self, block: int, state: int) -> int:
        """Rewrite one block's two-bit bitmap state (rgrp counts left alone)."""
        entry = next(e for e in self.rindex() if e.contains(block))
        raw, bitmap = self._bitmap(entry)
        set_state(bitmap, block - entry.data0, state)
        self._store_state(entry, raw, bitmap, block - entry.data0)
        return block

    def mark_free_block_used(self) -> int:
        """Mark the last free data block of the last rgrp USED; returns that block."""
        entry = self.rindex()[-1]
        _, bitmap = self._bitmap(entry)
        n = entry.data - 1
        while get_state(bitmap, n) != 0:
            n -= 1
        return self.set_block_state(entry.data0 + n, 1)

    def set_statfs_change(self, j: int, total: int, free: int, dinodes: int) -> int:
        addr = self.system(f"statfs_change{j}")
        block = self.read(addr)
        struct.pack_into(">qqq", block, DINODE_SIZE, total, free, dinodes)
        self.write(addr, block)
        return addr

    def break_dirent_hash(self, dir_addr: int, name: bytes) -> int:
        block = self.read(dir_addr)
        _, off = self.entries(dir_addr)[name]
        (h,) = struct.unpack_from(">I", block, off + 16)
        struct.pack_into(">I", block, off + 16, h ^ 0x00010000)
        self.write(dir_addr, block)
        return dir_addr

    def _add_u32(self, block_no: int, offset: int, delta: int) -> None:
        block = self.read(block_no)
        (v,) = struct.unpack_from(">I", block, offset)
        struct.pack_into(">I", block, offset, v + delta)
        self.write(block_no, block)

    def _add_u64(self, block_no: int, offset: int, delta: int) -> None:
        block = self.read(block_no)
        (v,) = struct.unpack_from(">Q", block, offset)
        struct.pack_into(">Q", block, offset, v + delta)
        self.write(block_no, block)

    def add_nlink(self, addr: int, delta: int) -> int:
        self._add_u32(addr, 52, delta)
        return addr

    def add_di_blocks(self, addr: int, delta: int) -> int:
        self._add_u64(addr, 64, delta)
        return addr

    def add_statfs_total(self, delta: int) -> int:
        addr = self.system("statfs")
        self._add_u64(addr, DINODE_SIZE, delta)
        return addr

    def journal_headers(self, j: int) -> list[tuple[int, LogHeader]]:
        """(device block, header) for every block of journal j (all headers after mkfs)."""
        out = []
        for b in self.data_blocks(self.system(f"journal{j}")):
            data = self.read(b)
            if peek_type(data) == 8:
                out.append((b, LogHeader.unpack(data)))
        return out

    def break_lh_crc(self, j: int, position: int) -> int:
        """Flip a bit of lh_crc in the header at journal block `position`."""
        b = self.data_blocks(self.system(f"journal{j}"))[position]
        block = self.read(b)
        block[48] ^= 0x01
        self.write(b, block)
        return b

    def make_journal_dirty(self, j: int) -> tuple[int, int]:
        """Clear UNMOUNT in journal j's head header (checksums kept valid).

        Returns (device block, sequence) of the head.
        """
        block_no, head = max(self.journal_headers(j), key=lambda bh: bh[1].sequence)
        head.flags &= ~LH_UNMOUNT
        self.write(block_no, head.pack_block(self.bsize))
        return block_no, head.sequence

    # -- corruptions of a populated image (see populate.py) -------------------------

    def set_u16(self, block_no: int, offset: int, value: int) -> int:
        block = self.read(block_no)
        struct.pack_into(">H", block, offset, value)
        self.write(block_no, block)
        return block_no

    def add_u16(self, block_no: int, offset: int, delta: int) -> int:
        block = self.read(block_no)
        (v,) = struct.unpack_from(">H", block, offset)
        struct.pack_into(">H", block, offset, v + delta)
        self.write(block_no, block)
        return block_no

    def set_u64(self, block_no: int, offset: int, value: int) -> int:
        block = self.read(block_no)
        struct.pack_into(">Q", block, offset, value)
        self.write(block_no, block)
        return block_no

    def set_type(self, block_no: int, mh_type: int) -> int:
        """Rewrite a metadata block's mh_type (format left alone)."""
        block = self.read(block_no)
        struct.pack_into(">I", block, 4, mh_type)
        self.write(block_no, block)
        return block_no

    def dirent_offset(self, dir_addr: int, name: bytes) -> int:
        return self.entries(dir_addr)[name][1]
