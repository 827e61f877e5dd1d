"""Recognise what already lives on a device, so mkfs never overwrites it by accident.

Only a few magic numbers at fixed offsets (the same ones blkid looks at first): enough
to catch the usual mistake of pointing mkfs at the wrong device. A blank or unknown
device is not protected; -O skips the check.
"""

from __future__ import annotations

import struct

from gfspy.ondisk.constants import GFS2_MAGIC, METATYPE_SB, SB_OFFSET

#: Bytes from the start of the device that `detect` needs to see.
PROBE_BYTES = SB_OFFSET + 4096


def detect(head: bytes) -> str | None:
    """Name of the filesystem or partition table found in `head`, or None."""

    def at(offset: int, magic: bytes) -> bool:
        return head[offset : offset + len(magic)] == magic

    if len(head) >= SB_OFFSET + 8:
        magic, mh_type = struct.unpack_from(">II", head, SB_OFFSET)
        if magic == GFS2_MAGIC and mh_type == METATYPE_SB:
            return "gfs2"
    if at(SB_OFFSET + 64, b"_BHRfS_M"):
        return "btrfs"
    if at(1080, b"\x53\xef"):
        return "ext2/ext3/ext4"
    if at(0, b"XFSB"):
        return "xfs"
    if at(0, b"LUKS\xba\xbe"):
        return "LUKS"
    if at(4086, b"SWAPSPACE2") or at(4086, b"SWAP-SPACE"):
        return "swap"
    if at(512 + 0, b"LABELONE"):
        return "LVM2 physical volume"
    if at(512, b"EFI PART"):
        return "GPT partition table"
    if at(510, b"\x55\xaa"):
        return "DOS partition table or boot sector"
    return None
