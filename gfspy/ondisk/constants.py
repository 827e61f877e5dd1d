"""Numbers fixed by the GFS2 on-disk format (fs format 1802, multihost 1900).

Everything here is a constant or is derived from the block size alone, so every layer
can share one definition and no module hard-codes 4096-byte arithmetic.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass

GFS2_MAGIC = 0x01161970

# Byte offset of the superblock, whatever the block size (basic block 128).
SB_OFFSET = 65536
BASIC_BLOCK = 512

# Sizes of the fixed-layout structures, in bytes.
META_HEADER_SIZE = 24
SB_SIZE = 272
RG_HEADER_SIZE = 128
RINDEX_ENTRY_SIZE = 96
DINODE_SIZE = 232
DIRENT_HEADER_SIZE = 40
LEAF_HEADER_SIZE = 104
EA_HEADER_SIZE = 16
LOG_HEADER_SIZE = 120
LOG_DESCRIPTOR_SIZE = 72
STATFS_CHANGE_SIZE = 24
QUOTA_CHANGE_SIZE = 16
QUOTA_ENTRY_SIZE = 88
INUM_SIZE = 16
INUM_RANGE_SIZE = 16

# Metadata block types (mh_type) and their matching mh_format values.
METATYPE_NONE = 0
METATYPE_SB = 1
METATYPE_RG = 2
METATYPE_RB = 3
METATYPE_DI = 4
METATYPE_IN = 5
METATYPE_LF = 6
METATYPE_JD = 7
METATYPE_LH = 8
METATYPE_LD = 9
METATYPE_EA = 10
METATYPE_ED = 11
METATYPE_LB = 12
METATYPE_QC = 14

FORMAT_NONE = 0
FORMAT_SB = 100
FORMAT_RG = 200
FORMAT_RB = 300
FORMAT_DI = 400
FORMAT_IN = 500
FORMAT_LF = 600
FORMAT_JD = 700
FORMAT_LH = 800
FORMAT_LD = 900
FORMAT_LB = 1000
FORMAT_RI = 1100
FORMAT_DE = 1200
FORMAT_QC = 1400
FORMAT_QU = 1500
FORMAT_EA = 1600
FORMAT_ED = 1700
FORMAT_FS = 1802
FORMAT_FS_MIN = 1801
FORMAT_MULTI = 1900

#: mh_format expected for each mh_type.
FORMAT_FOR_TYPE: dict[int, int] = {
    METATYPE_SB: FORMAT_SB,
    METATYPE_RG: FORMAT_RG,
    METATYPE_RB: FORMAT_RB,
    METATYPE_DI: FORMAT_DI,
    METATYPE_IN: FORMAT_IN,
    METATYPE_LF: FORMAT_LF,
    METATYPE_JD: FORMAT_JD,
    METATYPE_LH: FORMAT_LH,
    METATYPE_LD: FORMAT_LD,
    METATYPE_EA: FORMAT_EA,
    METATYPE_ED: FORMAT_ED,
    METATYPE_LB: FORMAT_LB,
    METATYPE_QC: FORMAT_QC,
}

#: Short names for messages ("expected DI block, found LF").
METATYPE_NAMES: dict[int, str] = {
    METATYPE_NONE: "NONE",
    METATYPE_SB: "SB",
    METATYPE_RG: "RG",
    METATYPE_RB: "RB",
    METATYPE_DI: "DI",
    METATYPE_IN: "IN",
    METATYPE_LF: "LF",
    METATYPE_JD: "JD",
    METATYPE_LH: "LH",
    METATYPE_LD: "LD",
    METATYPE_EA: "EA",
    METATYPE_ED: "ED",
    METATYPE_LB: "LB",
    METATYPE_QC: "QC",
}

# Dinode flags (di_flags).
DIF_JDATA = 0x00000001
DIF_EXHASH = 0x00000002
DIF_UNUSED = 0x00000004
DIF_EA_INDIRECT = 0x00000008
DIF_DIRECTIO = 0x00000010
DIF_IMMUTABLE = 0x00000020
DIF_APPENDONLY = 0x00000040
DIF_NOATIME = 0x00000080
DIF_SYNC = 0x00000100
DIF_SYSTEM = 0x00000200
DIF_TOPDIR = 0x00000400
DIF_TRUNC_IN_PROG = 0x20000000
DIF_INHERIT_DIRECTIO = 0x40000000
DIF_INHERIT_JDATA = 0x80000000

# Resource-group flags (rg_flags).
RGF_JOURNAL = 0x01
RGF_METAONLY = 0x02
RGF_DATAONLY = 0x04
RGF_NOALLOC = 0x08
RGF_TRIMMED = 0x10

# Two-bit block states in the rgrp bitmaps.
BLKST_FREE = 0
BLKST_USED = 1
BLKST_UNLINKED = 2
BLKST_DINODE = 3
FREE = BLKST_FREE
USED = BLKST_USED
UNLINKED = BLKST_UNLINKED
DINODE = BLKST_DINODE

# Log header flags (lh_flags). Only UNMOUNT decides clean vs dirty.
LH_UNMOUNT = 0x00000001
LH_FLUSH_NORMAL = 0x00000002
LH_FLUSH_SYNC = 0x00000004
LH_FLUSH_SHUTDOWN = 0x00000008
LH_FLUSH_FREEZE = 0x00000010
LH_RECOVERY = 0x00000020
LH_USERSPACE = 0x80000000
# "Log flush caller" bits: informational only.
LFC_SHUTDOWN = 0x00000100
LFC_JDATA_WPAGES = 0x00000200
LFC_SET_FLAGS = 0x00000400
LFC_AIL_EMPTY_GL = 0x00000800
LFC_AIL_FLUSH = 0x00001000
LFC_RGRP_GO_SYNC = 0x00002000
LFC_INODE_GO_SYNC = 0x00004000
LFC_INODE_GO_INVAL = 0x00008000
LFC_FREEZE_GO_SYNC = 0x00010000
LFC_KILL_SB = 0x00020000
LFC_DO_SYNC = 0x00040000
LFC_INPLACE_RESERVE = 0x00080000
LFC_WRITE_INODE = 0x00100000
LFC_MAKE_FS_RO = 0x00200000
LFC_SYNC_FS = 0x00400000
LFC_EVICT_INODE = 0x00800000
LFC_TRANS_END = 0x01000000
LFC_LOGD_JFLUSH_REQD = 0x02000000
LFC_LOGD_AIL_FLUSH_REQD = 0x04000000

# Log descriptor types (ld_type).
LD_METADATA = 300
LD_REVOKE = 301
LD_JDATA = 302

# Directory-entry types (de_type): the file-type bits of st_mode shifted down.
DT_UNKNOWN = 0
DT_FIFO = 1
DT_CHR = 2
DT_DIR = 4
DT_BLK = 6
DT_REG = 8
DT_LNK = 10
DT_SOCK = 12

DIR_MAX_DEPTH = 17
NAME_MAX = 255

# Extended-attribute record types (ea_type) and flags.
EATYPE_UNUSED = 0
EATYPE_USR = 1
EATYPE_SYS = 2
EATYPE_SECURITY = 3
EATYPE_TRUSTED = 4
EATYPE_LAST = EATYPE_TRUSTED
EAFLAG_LAST = 0x01
EA_MAX_DATA_LEN = 65536

# Quota-change record flags.
QCF_USER = 0x00000001


def dt_from_mode(mode: int) -> int:
    """The de_type a directory entry must carry for an inode of this st_mode.

    fsck compares the two, so writers derive one from the other instead of keeping
    a second table.
    """
    return (stat.S_IFMT(mode) >> 12) & 0xF


_U64_LIMIT = 1 << 64


def _height_table(first: int, second: int, inptrs: int) -> tuple[int, ...]:
    """Maximum size per tree height; the last entry stands for "anything larger".

    Built until one more level would overflow 64 bits, which is how the kernel bounds
    the tree height for a block size.
    """
    sizes = [first, second]
    while True:
        nxt = sizes[-1] * inptrs
        if nxt >= _U64_LIMIT:
            break
        sizes.append(nxt)
    sizes.append(_U64_LIMIT - 1)
    return tuple(sizes)


@dataclass(frozen=True, slots=True)
class Geometry:
    """Every count the format derives from the block size, computed once."""

    bsize: int
    bsize_shift: int
    sb_block: int
    diptrs: int
    inptrs: int
    jbsize: int
    hash_ptrs: int
    ldptrs: int
    jdata_per_ld: int
    revokes_per_lb: int
    qc_per_block: int
    rg_bitmap_bytes: int
    rb_bitmap_bytes: int
    heightsize: tuple[int, ...]
    jheightsize: tuple[int, ...]

    @classmethod
    def for_bsize(cls, bsize: int) -> Geometry:
        """Geometry of a filesystem with `bsize`-byte blocks (a power of two, 512..65536)."""
        if bsize < BASIC_BLOCK or bsize > SB_OFFSET or bsize & (bsize - 1):
            raise ValueError(f"block size {bsize} is not a power of two in 512..65536")
        diptrs = (bsize - DINODE_SIZE) // 8
        inptrs = (bsize - META_HEADER_SIZE) // 8
        jbsize = bsize - META_HEADER_SIZE
        return cls(
            bsize=bsize,
            bsize_shift=bsize.bit_length() - 1,
            sb_block=SB_OFFSET // bsize,
            diptrs=diptrs,
            inptrs=inptrs,
            jbsize=jbsize,
            hash_ptrs=bsize // 16,
            ldptrs=(bsize - LOG_DESCRIPTOR_SIZE) // 8,
            jdata_per_ld=(bsize - LOG_DESCRIPTOR_SIZE) // 16,
            revokes_per_lb=(bsize - META_HEADER_SIZE) // 8,
            qc_per_block=(bsize - META_HEADER_SIZE) // QUOTA_CHANGE_SIZE,
            rg_bitmap_bytes=bsize - RG_HEADER_SIZE,
            rb_bitmap_bytes=bsize - META_HEADER_SIZE,
            heightsize=_height_table(bsize - DINODE_SIZE, bsize * diptrs, inptrs),
            jheightsize=_height_table(bsize - DINODE_SIZE, jbsize * diptrs, inptrs),
        )

    @property
    def max_height(self) -> int:
        """Largest di_height the kernel accepts for this block size."""
        return len(self.heightsize) - 1

    @property
    def stuffed_size(self) -> int:
        """Bytes of data a stuffed (height 0) dinode holds."""
        return self.bsize - DINODE_SIZE

    @property
    def min_exhash_depth(self) -> int:
        """Smallest exhash depth newer kernels accept: log2(bsize / 16)."""
        return self.hash_ptrs.bit_length() - 1

    def height_for_size(self, size: int, is_dir: bool = False) -> int:
        """Smallest metadata-tree height that can address `size` bytes.

        Directories count JD payload bytes (jbsize per block), files whole blocks.
        """
        if size < 0:
            raise ValueError(f"negative file size {size}")
        table = self.jheightsize if is_dir else self.heightsize
        for height, limit in enumerate(table):
            if size <= limit:
                return height
        raise ValueError(f"file size {size} exceeds the largest tree for bsize {self.bsize}")
