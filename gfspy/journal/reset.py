"""Rewriting a whole journal as an empty, clean log.

Needed when a journal cannot be replayed and the operator agrees to discard it (the
repair fsck.gfs2 offers), and whenever a journal's blocks were moved. Every block
becomes a clean header whose sequence rises with its position, the same shape mkfs
gives a new journal, so any head-finding method agrees on where the head is.
"""

from __future__ import annotations

import logging

from gfspy.blockdev.device import Device
from gfspy.journal.extent import JournalExtents, write_log_blocks
from gfspy.journal.layout import build_log_header
from gfspy.ondisk.constants import LH_UNMOUNT, LH_USERSPACE

log = logging.getLogger(__name__)

_BATCH = 256  # header blocks per write


async def reset_journal(
    device: Device, extents: JournalExtents, *, jid: int, first_sequence: int = 0
) -> int:
    """Overwrite every block of the journal with a clean header and flush.

    Block n gets sequence first_sequence + n, so the head is the last block.
    Returns the head's sequence.
    """
    size = extents.blocks
    for start in range(0, size, _BATCH):
        count = min(_BATCH, size - start)
        blocks = [
            build_log_header(
                extents.bsize,
                jid=jid,
                sequence=first_sequence + pos,
                flags=LH_UNMOUNT | LH_USERSPACE,
                tail=0,
                blkno=pos,
                addr=extents.device_block(pos),
                jinode=extents.dinode_addr,
            )
            for pos in range(start, start + count)
        ]
        await write_log_blocks(device, extents, start, blocks)
    await device.flush()
    log.info("journal%d (%s): reset, %d clean headers", jid, device.name, size)
    return first_sequence + size - 1
