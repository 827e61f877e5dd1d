"""The fast fresh-journal generator writes exactly what gfspy.ondisk's LogHeader encodes
block by block (the zero-tail CRC shortcut must not change a single byte)."""

from __future__ import annotations

import pytest

from gfspy.mkfs.logheaders import MKFS_LH_FLAGS, journal_blocks
from gfspy.ondisk.journal import LogHeader


@pytest.mark.timeout(30)
@pytest.mark.parametrize("bsize", [512, 1024, 2048, 4096])
def test_fresh_journal_matches_ondisk_encoder(bsize: int) -> None:
    nblocks, start_seq, first_block, jinode = 300, 217, 5000, 4999
    chunks = list(
        journal_blocks(
            bsize=bsize,
            jinode=jinode,
            first_block=first_block,
            nblocks=nblocks,
            start_seq=start_seq,
            chunk_blocks=64,
        )
    )
    assert [block for block, _ in chunks] == list(range(first_block, first_block + nblocks, 64))
    data = b"".join(bytes(chunk) for _, chunk in chunks)
    assert len(data) == nblocks * bsize
    for j in range(nblocks):
        expected = LogHeader(
            sequence=(start_seq + j) % nblocks,  # rises by one and wraps once, like mkfs
            flags=MKFS_LH_FLAGS,
            tail=0,
            blkno=j,
            addr=first_block + j,
            jinode=jinode,
        ).pack_block(bsize)
        assert data[j * bsize : (j + 1) * bsize] == expected, j
        assert LogHeader.verify(expected)
