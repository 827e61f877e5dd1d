"""The log headers that fill a fresh journal, generated fast enough for huge journals.

A new journal is one clean log header per block (reference §7.2): flags
UNMOUNT|USERSPACE, tail 0, blkno = position, sequence numbers rising from a random
start and wrapping once. A 1 GiB journal is 262144 headers, each with a CRC-32C over
the whole block, so the CRC of the all-zero tail is not recomputed per block: CRC-32C
without a final inversion is linear, so running it over N zero bytes is a fixed linear
map of the 32-bit state, tabulated once per block size.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from functools import lru_cache

import crcmod

from gfspy.ondisk.checksums import lh_hash
from gfspy.ondisk.constants import LH_UNMOUNT, LH_USERSPACE, LOG_HEADER_SIZE
from gfspy.ondisk.journal import LogHeader

_crc32c_raw = crcmod.mkCrcFun(0x11EDC6F41, initCrc=0xFFFFFFFF, rev=True, xorOut=0)
# Offsets in the log header (reference §7.1) of what differs from block to block.
_SEQUENCE, _SEQUENCE_OFFSET = struct.Struct(">Q"), 24
_BLKNO, _BLKNO_OFFSET = struct.Struct(">I"), 40
_ADDR, _ADDR_OFFSET = struct.Struct(">Q"), 64
_U32 = struct.Struct(">I")
_HASH_OFFSET = 44
_CRC_OFFSET = 48
_CRC_START = 52  # lh_crc covers bytes 52..end of block
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
    as mkfs makes it); `start_seq` is the sequence number of journal block 0. The
    header is encoded once by gfspy.ondisk; per block only the three fields that change
    (sequence, blkno, addr) and the two checksums are patched in.
    """
    template = bytearray(
        LogHeader(sequence=0, flags=MKFS_LH_FLAGS, tail=0, blkno=0, jinode=jinode).pack()
    )
    tail_zeros = bsize - LOG_HEADER_SIZE
    seq = start_seq
    done = 0
    while done < nblocks:
        count = min(chunk_blocks, nblocks - done)
        buf = bytearray(count * bsize)
        for i in range(count):
            jblock = done + i
            _SEQUENCE.pack_into(template, _SEQUENCE_OFFSET, seq)
            _BLKNO.pack_into(template, _BLKNO_OFFSET, jblock)
            _ADDR.pack_into(template, _ADDR_OFFSET, first_block + jblock)
            _U32.pack_into(template, _HASH_OFFSET, lh_hash(template))
            crc = _crc_with_zero_tail(bytes(template[_CRC_START:]), tail_zeros)
            off = i * bsize
            buf[off : off + LOG_HEADER_SIZE] = template
            _U32.pack_into(buf, off + _CRC_OFFSET, crc)
            seq += 1
            if seq == nblocks:
                seq = 0
        yield first_block + done, buf
        done += count
