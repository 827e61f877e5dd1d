"""The log headers that fill a fresh journal, generated fast enough for huge journals.

A new journal is one clean log header per block (reference §7.2): flags
UNMOUNT|USERSPACE, tail 0, blkno = position, sequence numbers rising from a random
start and wrapping once. A 1 GiB journal is 262144 headers, each with a CRC-32C over
the whole block, so the CRC of the all-zero tail is not recomputed per block: CRC-32C
without a final inversion is linear, so running it over N zero bytes is a fixed linear
map of the 32-bit state, tabulated once per block size.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

import crcmod

from gfspy.ondisk.constants import LH_UNMOUNT, LH_USERSPACE, LOG_HEADER_SIZE
from gfspy.ondisk.journal import LogHeader

_crc32c_raw = crcmod.mkCrcFun(0x11EDC6F41, initCrc=0xFFFFFFFF, rev=True, xorOut=0)
_CRC_START = 52  # lh_crc covers bytes 52..end of block and is stored at 48
_CRC_OFFSET = 48
MKFS_LH_FLAGS = LH_UNMOUNT | LH_USERSPACE


@lru_cache(maxsize=8)
def _zero_tail_tables(zero_bytes: int) -> tuple[tuple[int, ...], ...]:
    """Four 256-entry tables: effect of `zero_bytes` zero bytes on each state byte."""
    zeros = bytes(zero_bytes)
    return tuple(
        tuple(_crc32c_raw(zeros, value << (8 * lane)) for value in range(256)) for lane in range(4)
    )


def _crc_with_zero_tail(head: bytes, zero_bytes: int) -> int:
    state = _crc32c_raw(head)
    t0, t1, t2, t3 = _zero_tail_tables(zero_bytes)
    return t0[state & 0xFF] ^ t1[(state >> 8) & 0xFF] ^ t2[(state >> 16) & 0xFF] ^ t3[state >> 24]


def journal_blocks(
    *,
    bsize: int,
    jinode: int,
    first_block: int,
    nblocks: int,
    start_seq: int,
    chunk_blocks: int,
) -> Iterator[tuple[int, bytearray]]:
    """Yield (device block, data) chunks holding the headers of a whole fresh journal.

    `first_block` is the device block of journal block 0 (the journal is contiguous,
    as mkfs makes it); `start_seq` is the sequence number of journal block 0.
    """
    tail_zeros = bsize - LOG_HEADER_SIZE
    seq = start_seq
    done = 0
    while done < nblocks:
        count = min(chunk_blocks, nblocks - done)
        buf = bytearray(count * bsize)
        for i in range(count):
            off = i * bsize
            jblock = done + i
            header = LogHeader(
                sequence=seq,
                flags=MKFS_LH_FLAGS,
                tail=0,
                blkno=jblock,
                addr=first_block + jblock,
                jinode=jinode,
            ).pack()  # lh_hash filled in, lh_crc still 0
            buf[off : off + LOG_HEADER_SIZE] = header
            crc = _crc_with_zero_tail(header[_CRC_START:], tail_zeros)
            buf[off + _CRC_OFFSET : off + _CRC_OFFSET + 4] = crc.to_bytes(4, "big")
            seq += 1
            if seq == nblocks:
                seq = 0
        yield first_block + done, buf
        done += count
