"""The four checksums GFS2 stores on disk.

Three are the ordinary zlib CRC-32; only the log header's lh_crc is CRC-32C, and it
is stored without the final inversion, which is why it gets its own crcmod function
rather than crcmod's predefined 'crc-32c' (that one returns the complement).
"""

from __future__ import annotations

import zlib

import crcmod

from .constants import RG_HEADER_SIZE

# CRC-32C (Castagnoli), reflected, init all-ones, no final xor: the lh_crc recipe.
_crc32c_no_inversion = crcmod.mkCrcFun(0x11EDC6F41, initCrc=0xFFFFFFFF, rev=True, xorOut=0)

_RG_CRC_OFFSET = 64
_LH_HASH_OFFSET = 44
_LH_HASH_SPAN = 48
_LH_CRC_START = 52

Buffer = bytes | bytearray | memoryview


def name_hash(name: bytes) -> int:
    """Hash of a directory-entry name (de_hash and the exhash table index)."""
    return zlib.crc32(name)


def rg_crc(header: Buffer) -> int:
    """rg_crc of an RG block: CRC-32 of its first 128 bytes with the crc field zeroed."""
    if len(header) < RG_HEADER_SIZE:
        raise ValueError(f"rg_crc needs {RG_HEADER_SIZE} bytes, got {len(header)}")
    view = memoryview(header)
    crc = zlib.crc32(view[:_RG_CRC_OFFSET])
    crc = zlib.crc32(b"\0\0\0\0", crc)
    return zlib.crc32(view[_RG_CRC_OFFSET + 4 : RG_HEADER_SIZE], crc)


def lh_hash(block: Buffer) -> int:
    """lh_hash of a log header: CRC-32 of bytes 0..47 with the hash field zeroed."""
    if len(block) < _LH_HASH_SPAN:
        raise ValueError(f"lh_hash needs {_LH_HASH_SPAN} bytes, got {len(block)}")
    view = memoryview(block)
    crc = zlib.crc32(view[:_LH_HASH_OFFSET])
    return zlib.crc32(b"\0\0\0\0", crc)


def lh_crc(block: Buffer) -> int:
    """lh_crc of a log-header block: CRC-32C (no final inversion) of bytes 52..end.

    `block` must be the whole journal block; the checksum covers the zero padding too.
    """
    if len(block) < _LH_CRC_START:
        raise ValueError(f"lh_crc needs at least {_LH_CRC_START} bytes, got {len(block)}")
    return _crc32c_no_inversion(bytes(memoryview(block)[_LH_CRC_START:]))
