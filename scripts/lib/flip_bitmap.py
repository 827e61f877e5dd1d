"""Demo helper: mark one free block of the last resource group as used, the kind of
fault a buggy writer leaves behind (and that gfspy-fsck must name)."""

import struct
import sys

from gfspy.ondisk.rgrp import RindexEntry
from gfspy.ondisk.superblock import Superblock

BITMAP_OFFSET_IN_RG = 128  # bitmap bytes start after the 128-byte RG header

with open(sys.argv[1], "r+b") as image:
    image.seek(Superblock.OFFSET)
    sb = Superblock.unpack(image.read(Superblock.SIZE))
    bsize = sb.bsize

    def block(n: int) -> bytes:
        image.seek(n * bsize)
        return image.read(bsize)

    def lookup(dir_addr: int, name: bytes) -> int:
        """Find NAME in a stuffed directory (the master directory is stuffed)."""
        data = block(dir_addr)
        offset = 232
        while offset < bsize:
            addr, _hash, rec_len, name_len = struct.unpack_from(">8xQIHH", data, offset)
            if data[offset + 40 : offset + 40 + name_len] == name:
                return addr
            offset += rec_len
        raise SystemExit(f"{name.decode()} not found")

    rindex = block(lookup(sb.master_dir.addr, b"rindex"))
    size = struct.unpack_from(">Q", rindex, 56)[0]
    last = RindexEntry.unpack(rindex, 232 + size - RindexEntry.SIZE)
    bitmap_byte = 1000  # inside the RG header block, past the system files
    target_byte = last.addr * bsize + BITMAP_OFFSET_IN_RG + bitmap_byte
    image.seek(target_byte)
    old = image.read(1)[0]
    image.seek(target_byte)
    image.write(bytes([old | 0x01]))
    print(f"marked block {last.data0 + bitmap_byte * 4} used in rgrp {last.addr}")
