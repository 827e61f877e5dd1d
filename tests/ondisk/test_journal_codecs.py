"""Log headers, descriptors, revoke lists and JDATA escaping."""

from __future__ import annotations

import pytest

from gfspy.ondisk import constants as C
from gfspy.ondisk.errors import FormatError
from gfspy.ondisk.journal import (
    LogDescriptor,
    LogHeader,
    escape_jdata,
    pack_revokes,
    revoke_blocks_needed,
    unescape_jdata,
    unpack_revokes,
)
from gfspy.ondisk.meta import peek_type


@pytest.mark.timeout(10)
@pytest.mark.parametrize("bsize", [512, 4096])
def test_log_header_checksums(bsize: int) -> None:
    header = LogHeader(
        sequence=2048,
        flags=C.LH_FLUSH_NORMAL,
        tail=7,
        blkno=9,
        addr=33,
        jinode=18,
        local_free=-12,
        jid=1,
    )
    block = bytearray(header.pack_block(bsize))
    assert len(block) == bsize and LogHeader.verify(block)
    decoded = LogHeader.unpack(block)
    assert decoded == header and decoded.jid == 1 and decoded.crc == header.crc != 0
    assert not decoded.is_clean
    block[bsize - 1] ^= 1  # covered by lh_crc only
    assert not LogHeader.verify(block)
    block[bsize - 1] ^= 1
    block[30] ^= 1  # covered by lh_hash
    assert not LogHeader.verify(block)


@pytest.mark.timeout(10)
def test_log_header_without_crc_is_valid() -> None:
    """fsck writes its post-replay header with lh_crc 0, meaning "no crc"."""
    header = LogHeader(sequence=5, flags=C.LH_UNMOUNT, tail=0, blkno=3)
    block = header.pack_block(4096, with_crc=False)
    assert block[48:52] == bytes(4) and LogHeader.verify(block)
    assert LogHeader.unpack(block).is_clean
    assert not LogHeader.verify(bytes(4096))
    assert not LogHeader.verify(block[:100])


@pytest.mark.timeout(10)
def test_metadata_descriptor_round_trip() -> None:
    descriptor = LogDescriptor.metadata([4656, 17, 2**40])
    block = descriptor.pack_block(4096)
    assert peek_type(block) == C.METATYPE_LD
    decoded = LogDescriptor.unpack(block)
    assert decoded == descriptor
    assert (decoded.ld_type, decoded.length, decoded.data1) == (C.LD_METADATA, 4, 3)


@pytest.mark.timeout(10)
def test_jdata_descriptor_round_trip() -> None:
    descriptor = LogDescriptor.jdata([100, 101], [1, 0])
    decoded = LogDescriptor.unpack(descriptor.pack_block(512))
    assert decoded.blocks == [100, 101] and decoded.escaped == [1, 0]
    assert decoded.length == 3
    with pytest.raises(ValueError):
        LogDescriptor.jdata([1], [])


@pytest.mark.timeout(10)
def test_descriptor_item_count_is_bounded() -> None:
    block = bytearray(LogDescriptor.metadata([1]).pack_block(512))
    block[32:36] = (56).to_bytes(4, "big")  # 56 items > 55 that fit in 512 bytes
    with pytest.raises(FormatError, match="exceed"):
        LogDescriptor.unpack(block)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("count", [0, 1, 503, 504, 503 + 509, 503 + 509 + 1, 3000])
def test_revokes_span_continuation_blocks(count: int) -> None:
    revoked = list(range(1000, 1000 + count))
    blocks = pack_revokes(4096, revoked)
    assert len(blocks) == revoke_blocks_needed(4096, count)
    assert all(len(b) == 4096 for b in blocks)
    assert [peek_type(b) for b in blocks[1:]] == [C.METATYPE_LB] * (len(blocks) - 1)
    descriptor = LogDescriptor.unpack(blocks[0])
    assert descriptor.length == len(blocks) and descriptor.data1 == count
    assert unpack_revokes(blocks) == revoked


@pytest.mark.timeout(10)
def test_revoke_list_errors() -> None:
    blocks = pack_revokes(512, list(range(200)))
    with pytest.raises(FormatError, match="spans"):
        unpack_revokes(blocks[:-1])
    with pytest.raises(FormatError, match="not REVOKE"):
        unpack_revokes([LogDescriptor.metadata([1]).pack_block(512)])
    bad = list(blocks)
    bad[1] = LogDescriptor.metadata([1]).pack_block(512)
    with pytest.raises(FormatError, match="expected LB"):
        unpack_revokes(bad)


@pytest.mark.timeout(10)
def test_jdata_escaping() -> None:
    data = b"\x01\x16\x19\x70" + b"payload" * 10
    logged, escaped = escape_jdata(data)
    assert escaped == 1 and logged[:4] == bytes(4) and logged[4:] == data[4:]
    assert peek_type(logged) is None
    assert unescape_jdata(logged, escaped) == data
    plain = b"hello world"
    assert escape_jdata(plain) == (plain, 0)
    assert unescape_jdata(plain, 0) == plain
