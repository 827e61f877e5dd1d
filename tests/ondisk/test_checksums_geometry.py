"""Checksums against values verified on real images, and the derived-constant table."""

from __future__ import annotations

import struct
import zlib

import pytest

from gfspy.ondisk.checksums import lh_crc, lh_hash, name_hash, rg_crc
from gfspy.ondisk.constants import (
    DT_BLK,
    DT_CHR,
    DT_DIR,
    DT_FIFO,
    DT_LNK,
    DT_REG,
    DT_SOCK,
    Geometry,
    dt_from_mode,
)

# Name hashes the reference verified on a real image (§4.3).
KNOWN_NAME_HASHES = {
    b".": 0x0ED4E242,
    b"..": 0x9608161C,
    b"jindex": 0x5EFC1D83,
    b"per_node": 0x486EEE32,
    b"inum": 0x446811E9,
    b"statfs": 0x1AEF248E,
    b"rindex": 0xB1799D75,
    b"quota": 0x6C1C0FED,
    b"journal0": 0xFC7745EB,
    b"journal1": 0x8B70757D,
    b"lost+found": 0x6AB47928,
}


@pytest.mark.timeout(10)
@pytest.mark.parametrize("name", sorted(KNOWN_NAME_HASHES))
def test_name_hash_known_values(name: bytes) -> None:
    assert name_hash(name) == KNOWN_NAME_HASHES[name]


@pytest.mark.timeout(10)
def test_rg_crc_ignores_its_own_field() -> None:
    header = bytearray(range(128))
    crc = rg_crc(header)
    struct.pack_into(">I", header, 64, 0xDEADBEEF)
    assert rg_crc(header) == crc
    zeroed = bytearray(header)
    zeroed[64:68] = bytes(4)
    assert crc == zlib.crc32(bytes(zeroed))
    # A byte past 128 is not covered; one inside is.
    assert rg_crc(bytes(header) + b"xyz") == crc
    header[127] ^= 1
    assert rg_crc(header) != crc


@pytest.mark.timeout(10)
def test_lh_hash_covers_only_first_48_bytes() -> None:
    block = bytearray(4096)
    block[0:4] = b"\x01\x16\x19\x70"
    base = lh_hash(block)
    block[44:48] = b"\xff\xff\xff\xff"  # its own field
    block[60] = 7  # beyond byte 47
    assert lh_hash(block) == base
    block[30] = 1
    assert lh_hash(block) != base


@pytest.mark.timeout(10)
def test_lh_crc_is_crc32c_without_final_inversion() -> None:
    # The standard CRC-32C check value of "123456789" is 0xE3069283; the on-disk
    # variant omits the final inversion, so it is the complement.
    block = bytes(52) + b"123456789"
    assert lh_crc(block) == 0xE3069283 ^ 0xFFFFFFFF
    # Bytes before 52 (header, hash, crc field) are not covered.
    assert lh_crc(b"\xaa" * 52 + b"123456789") == lh_crc(block)


@pytest.mark.timeout(10)
def test_checksums_refuse_short_buffers() -> None:
    with pytest.raises(ValueError):
        rg_crc(bytes(100))
    with pytest.raises(ValueError):
        lh_hash(bytes(40))


# bsize: diptrs, inptrs, jbsize, hash_ptrs, ldptrs, jdata per LD, qc per block (§0.2).
DERIVED = {
    512: (35, 61, 488, 32, 55, 27, 30),
    1024: (99, 125, 1000, 64, 119, 59, 62),
    2048: (227, 253, 2024, 128, 247, 123, 126),
    4096: (483, 509, 4072, 256, 503, 251, 254),
}


@pytest.mark.timeout(10)
@pytest.mark.parametrize("bsize", sorted(DERIVED))
def test_geometry_table(bsize: int) -> None:
    g = Geometry.for_bsize(bsize)
    got = (g.diptrs, g.inptrs, g.jbsize, g.hash_ptrs, g.ldptrs, g.jdata_per_ld, g.qc_per_block)
    assert got == DERIVED[bsize]
    assert 1 << g.bsize_shift == bsize
    assert g.sb_block * bsize == 65536
    assert g.heightsize[-1] == 2**64 - 1
    assert all(a < b for a, b in zip(g.heightsize, g.heightsize[1:], strict=False))


@pytest.mark.timeout(10)
def test_height_sizes_4k_match_reference() -> None:
    g = Geometry.for_bsize(4096)
    assert g.heightsize[:6] == (
        3864,
        1978368,
        1006989312,
        512557559808,
        260891797942272,
        132793925152616448,
    )
    assert g.jheightsize[:6] == (
        3864,
        1966776,
        1001088984,
        509554292856,
        259363135063704,
        132015835747425336,
    )
    assert g.max_height == 6
    assert g.min_exhash_depth == 8


@pytest.mark.timeout(10)
def test_height_for_size_boundaries() -> None:
    g = Geometry.for_bsize(4096)
    assert g.height_for_size(0) == 0
    assert g.height_for_size(3864) == 0
    assert g.height_for_size(3865) == 1
    assert g.height_for_size(8 << 20) == 2  # mkfs journals: height 2
    assert g.height_for_size(1978368) == 1
    assert g.height_for_size(1978369) == 2
    # Directories count 4072-byte JD payloads, so they grow sooner.
    assert g.height_for_size(1966777, is_dir=True) == 2
    assert g.height_for_size(1966777) == 1
    assert g.height_for_size(2**63) == 6
    with pytest.raises(ValueError):
        g.height_for_size(-1)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("bsize", [0, 256, 1000, 3000, 131072])
def test_geometry_rejects_bad_block_sizes(bsize: int) -> None:
    with pytest.raises(ValueError):
        Geometry.for_bsize(bsize)


@pytest.mark.timeout(10)
def test_dt_from_mode() -> None:
    assert dt_from_mode(0o040755) == DT_DIR
    assert dt_from_mode(0o100644) == DT_REG
    assert dt_from_mode(0o120777) == DT_LNK
    assert dt_from_mode(0o020600) == DT_CHR
    assert dt_from_mode(0o060600) == DT_BLK
    assert dt_from_mode(0o010600) == DT_FIFO
    assert dt_from_mode(0o140755) == DT_SOCK
