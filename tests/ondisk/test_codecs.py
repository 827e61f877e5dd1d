"""Encoders and decoders on synthetic structures: round trips, sizes, FormatError."""

from __future__ import annotations

import random
import struct
import uuid

import pytest

from gfspy.ondisk import constants as C
from gfspy.ondisk.dinode import Dinode
from gfspy.ondisk.directory import (
    Dirent,
    Leaf,
    dirent_size,
    hash_index,
    iter_dirents,
    jd_payload,
    live_dirents,
    new_stuffed_dir_payload,
    pack_dirents,
    pack_hash_table,
    pack_jd_block,
    unpack_hash_table,
)
from gfspy.ondisk.errors import FormatError
from gfspy.ondisk.indirect import (
    block_path,
    pack_indirect_block,
    pack_pointers,
    unpack_indirect_block,
    unpack_pointers,
)
from gfspy.ondisk.journal import LogHeader
from gfspy.ondisk.meta import Inum, MetaHeader, expect_header, peek_type
from gfspy.ondisk.quota import QuotaChange, QuotaEntry, pack_qc_block, unpack_qc_block
from gfspy.ondisk.rgrp import RgrpBitmapHeader, RgrpHeader, RindexEntry, unpack_rindex
from gfspy.ondisk.statfs import StatfsChange
from gfspy.ondisk.superblock import Superblock
from gfspy.ondisk.xattr import (
    EARecord,
    ea_is_stuffed,
    ea_num_ptrs,
    iter_ea_records,
    join_xattr_name,
    new_ea_block,
    pack_ea_block,
    split_xattr_name,
)

BSIZE = 4096


@pytest.mark.timeout(10)
def test_meta_header_layout_and_peek() -> None:
    raw = MetaHeader(C.METATYPE_LH, C.FORMAT_LH, 3).pack()
    assert raw == bytes.fromhex("01161970 00000008 0000000000000000 00000320 00000003")
    assert MetaHeader.unpack(raw) == MetaHeader(8, 800, 3)
    assert peek_type(raw) == C.METATYPE_LH
    assert peek_type(bytes(24)) is None
    assert peek_type(b"\x01\x16") is None
    assert peek_type(b"xx" + raw, 2) == C.METATYPE_LH


@pytest.mark.timeout(10)
def test_header_errors_name_the_problem() -> None:
    with pytest.raises(FormatError, match="bad magic"):
        MetaHeader.unpack(bytes(24))
    with pytest.raises(FormatError, match="need 24 bytes"):
        MetaHeader.unpack(b"\x01\x16\x19\x70")
    leaf = Leaf().pack_block(BSIZE)
    with pytest.raises(FormatError, match="expected DI block, found LF"):
        Dinode.unpack(leaf)
    bad_format = bytearray(leaf)
    struct.pack_into(">I", bad_format, 16, 601)
    with pytest.raises(FormatError, match="bad format 601"):
        expect_header(bad_format, 0, C.METATYPE_LF, "leaf", check_format=True)
    assert Leaf.unpack(bad_format) == Leaf()  # decoders, like the kernel, ignore it


# Every decoder must refuse random bytes and truncated buffers with FormatError.
DECODERS = [
    Superblock.unpack,
    RgrpHeader.unpack,
    RgrpBitmapHeader.unpack,
    Dinode.unpack,
    Leaf.unpack,
    unpack_indirect_block,
    unpack_qc_block,
    jd_payload,
    iter_ea_records,
]


@pytest.mark.timeout(20)
@pytest.mark.parametrize("decode", DECODERS, ids=lambda f: f.__qualname__)
def test_decoders_refuse_garbage(decode) -> None:
    rng = random.Random(42)
    for _ in range(50):
        garbage = rng.randbytes(BSIZE)
        if garbage[:4] == b"\x01\x16\x19\x70":
            continue
        with pytest.raises(FormatError):
            result = decode(garbage)
            if hasattr(result, "__next__"):
                list(result)
    for length in (0, 3, 23):
        with pytest.raises(FormatError):
            result = decode(b"\x01\x16\x19\x70"[:length] + bytes(max(0, length - 4)))
            if hasattr(result, "__next__"):
                list(result)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("structure", "size"),
    [
        (Superblock(4096, 12, Inum(3, 2072), Inum(16, 4656), "lock_dlm", "c:fs"), 272),
        (RindexEntry(17, 1, 18, 2056, 514), 96),
        (RgrpHeader(free=5, data0=18, data=2056, bitbytes=514), 128),
        (Dinode(formal=3, addr=2072, mode=0o40755), 232),
        (Leaf(depth=3, entries=2, inode=99), 104),
        (StatfsChange(65512, 60878, 16), 24),
        (QuotaChange(-5, C.QCF_USER, 1000), 16),
        (QuotaEntry(0, 0, 1), 88),
        (Inum(1, 2), 16),
    ],
    ids=lambda value: type(value).__name__ if not isinstance(value, int) else str(value),
)
def test_pack_size_and_round_trip(structure, size: int) -> None:
    raw = structure.pack()
    assert len(raw) == size
    decoded = type(structure).unpack(raw)
    assert decoded == structure
    # Offsets and memoryviews are accepted.
    assert type(structure).unpack(memoryview(b"\0" * 8 + raw), 8) == structure


@pytest.mark.timeout(10)
def test_superblock_fields_and_limits() -> None:
    fs_uuid = uuid.uuid4()
    sb = Superblock(1024, 10, Inum(3, 9), Inum(16, 99), "lock_nolock", "", fs_uuid)
    block = sb.pack_block()
    assert len(block) == 1024 and sb.sb_block == 64
    assert block[96:107] == b"lock_nolock" and block[256:272] == fs_uuid.bytes
    assert Superblock.unpack(block) == sb
    with pytest.raises(FormatError, match="locktable"):
        Superblock(4096, 12, Inum(1, 1), Inum(1, 1), "lock_dlm", "x" * 64).pack()
    bad_shift = bytearray(block)
    struct.pack_into(">I", bad_shift, 40, 11)
    with pytest.raises(FormatError, match="bsize_shift"):
        Superblock.unpack(bad_shift)


@pytest.mark.timeout(10)
def test_rindex_ignores_garbage_and_writes_zeros() -> None:
    entry = RindexEntry(4131, 4, 4135, 61400, 15350)
    raw = bytearray(entry.pack())
    assert raw[12:16] == bytes(4) and raw[32:96] == bytes(64)
    raw[12:16] = b"\xde\xad\xbe\xef"
    raw[32:96] = b"\xaa" * 64
    assert RindexEntry.unpack(raw) == entry
    assert unpack_rindex(bytes(raw) * 3) == [entry] * 3
    with pytest.raises(FormatError, match="multiple of 96"):
        unpack_rindex(bytes(100))


@pytest.mark.timeout(10)
def test_rgrp_crc_written_and_checked() -> None:
    header = RgrpHeader(free=60878, dinodes=10, data0=4135, data=61400, bitbytes=15350)
    block = bytearray(header.pack_block(BSIZE))
    assert header.crc != 0
    decoded = RgrpHeader.unpack(block)
    assert decoded.crc_ok and decoded.crc == header.crc and decoded == header
    block[30] ^= 0x01  # corrupt rg_free
    assert not RgrpHeader.unpack(block).crc_ok
    block[64:68] = bytes(4)  # crc 0 means "no checksum"
    assert RgrpHeader.unpack(block).crc_ok


@pytest.mark.timeout(10)
def test_dinode_flags_and_payload() -> None:
    di = Dinode(formal=7, addr=500, mode=0o40755, flags=C.DIF_JDATA | C.DIF_EXHASH)
    assert di.is_dir() and di.is_jdata() and di.is_exhash() and not di.is_system()
    assert di.inum == Inum(7, 500) and di.has_valid_type()
    assert not Dinode(formal=1, addr=1, mode=0o170000).has_valid_type()
    block = di.pack_block(BSIZE, b"hello")
    assert bytes(Dinode.payload(block)[:5]) == b"hello" and len(Dinode.payload(block)) == 3864
    with pytest.raises(FormatError):
        di.pack_block(BSIZE, bytes(3865))
    # Signed timestamps survive the round trip.
    old = Dinode(formal=1, addr=2, mode=0o100644, atime=-1, mtime=-(2**40))
    assert Dinode.unpack(old.pack()) == old


@pytest.mark.timeout(10)
def test_pointer_arrays_and_indirect_blocks() -> None:
    ptrs = [5, 0, 2**64 - 1]
    assert unpack_pointers(pack_pointers(ptrs), 0, 3) == ptrs
    block = pack_indirect_block(512, list(range(1, 62)))
    assert unpack_indirect_block(block) == list(range(1, 62))
    with pytest.raises(FormatError):
        pack_indirect_block(512, list(range(62)))
    with pytest.raises(FormatError):
        pack_pointers([-1])


@pytest.mark.timeout(10)
def test_block_path_is_base_inptrs() -> None:
    assert block_path(0, 1, 509, 483) == [0]
    assert block_path(482, 1, 509, 483) == [482]
    assert block_path(2047, 2, 509, 483) == [4, 2047 - 4 * 509]
    assert block_path(509 * 509 + 3, 3, 509, 483) == [1, 0, 3]
    with pytest.raises(ValueError):
        block_path(483, 1, 509, 483)


@pytest.mark.timeout(10)
def test_dirent_sizes_and_stuffed_directory() -> None:
    assert [dirent_size(n) for n in (1, 8, 9, 255)] == [48, 48, 56, 296]
    payload = new_stuffed_dir_payload(BSIZE, Inum(16, 4656), Inum(16, 4656))
    assert len(payload) == 3864
    dirents = [d for _, d in iter_dirents(payload, 0, len(payload))]
    assert [(d.name, d.rec_len, d.type) for d in dirents] == [
        (b".", 48, C.DT_DIR),
        (b"..", 3816, C.DT_DIR),
    ]
    assert dirents[0].hash == 0x0ED4E242


@pytest.mark.timeout(10)
def test_dirent_chain_validation() -> None:
    area = pack_dirents([Dirent.make(b"a", Inum(1, 10), C.DT_REG)], 200)
    assert [o for o, _ in iter_dirents(area, 0, 200)] == [0]
    broken = bytearray(area)
    struct.pack_into(">H", broken, 20, 48)  # chain now stops short of the end
    with pytest.raises(FormatError, match="chain broken|too small"):
        list(iter_dirents(broken, 0, 200))
    struct.pack_into(">H", broken, 20, 208)  # past the end
    with pytest.raises(FormatError, match="runs past"):
        list(iter_dirents(broken, 0, 200))
    struct.pack_into(">H", broken, 20, 0)
    with pytest.raises(FormatError, match="too small"):
        list(iter_dirents(broken, 0, 200))
    struct.pack_into(">HH", broken, 20, 48, 9)  # name longer than its record
    with pytest.raises(FormatError, match="does not fit"):
        list(iter_dirents(broken, 0, 48))
    with pytest.raises(FormatError):
        pack_dirents([Dirent.make(b"x" * 100, Inum(1, 1), C.DT_REG)] * 3, 300)
    with pytest.raises(FormatError):
        Dirent.make(b"", Inum(1, 1), C.DT_REG)


@pytest.mark.timeout(10)
def test_empty_leaf_has_one_sentinel() -> None:
    block = Leaf(depth=8, inode=4656).pack_block(BSIZE)
    entries = list(iter_dirents(block, Leaf.SIZE, BSIZE))
    assert len(entries) == 1 and entries[0][1].is_sentinel()
    assert entries[0][1].rec_len == BSIZE - Leaf.SIZE
    assert list(live_dirents(block, Leaf.SIZE, BSIZE)) == []
    assert Leaf.unpack(block) == Leaf(depth=8, inode=4656)


@pytest.mark.timeout(10)
def test_hash_table_and_jd_blocks() -> None:
    assert hash_index(0xFFFFFFFF, 8) == 255 and hash_index(0x0ED4E242, 8) == 0x0E
    assert hash_index(0x12345678, 0) == 0
    table = [100 + i // 4 for i in range(256)]
    raw = pack_hash_table(table)
    assert len(raw) == 2048 and unpack_hash_table(raw, 8) == table
    block = pack_jd_block(BSIZE, raw)
    assert bytes(jd_payload(block)[:2048]) == raw and len(jd_payload(block)) == 4072


@pytest.mark.timeout(10)
def test_statfs_and_quota_change_blocks() -> None:
    assert StatfsChange(10, 5, 1) + StatfsChange(-1, -2, 3) == StatfsChange(9, 3, 4)
    records = [QuotaChange(-3, C.QCF_USER, 0), QuotaChange(7, 0, 100)]
    block = pack_qc_block(BSIZE, records)
    decoded = unpack_qc_block(block)
    assert len(decoded) == 254 and decoded[:2] == records and decoded[0].is_user
    with pytest.raises(FormatError):
        pack_qc_block(512, [QuotaChange()] * 31)


@pytest.mark.timeout(10)
def test_xattr_names_and_stuffing() -> None:
    assert split_xattr_name(b"user.mime") == (C.EATYPE_USR, b"mime")
    assert split_xattr_name(b"security.selinux") == (C.EATYPE_SECURITY, b"selinux")
    assert join_xattr_name(C.EATYPE_TRUSTED, b"x") == b"trusted.x"
    with pytest.raises(FormatError):
        split_xattr_name(b"bogus.x")
    assert ea_is_stuffed(4072, 4, 4072 - 16 - 4)
    assert not ea_is_stuffed(4072, 4, 4072 - 16 - 3)
    assert ea_num_ptrs(4072, 10000) == 3


@pytest.mark.timeout(10)
def test_ea_block_round_trip_and_chain_errors() -> None:
    stuffed = EARecord(0, 5, 4, C.EATYPE_USR, name=b"mime", value=b"hello")
    stuffed.rec_len = stuffed.size
    unstuffed = EARecord(0, 9000, 3, C.EATYPE_USR, C.EAFLAG_LAST, 3, b"big", b"", (7, 8, 9))
    unstuffed.rec_len = BSIZE - 24 - stuffed.rec_len
    block = pack_ea_block(BSIZE, [stuffed, unstuffed])
    records = list(iter_ea_records(block))
    assert [r for _, r in records] == [stuffed, unstuffed]
    assert records[1][0] == 24 + 32  # 16 + 4 + 5 -> 25, aligned to 32
    assert pack_ea_block(BSIZE, [r for _, r in records]) == block
    fresh = new_ea_block(BSIZE)
    (only,) = [r for _, r in iter_ea_records(fresh)]
    assert only.type == C.EATYPE_UNUSED and only.is_last and only.rec_len == 4072
    no_last = bytearray(block)
    no_last[24 + 32 + 10] = 0  # clear LAST on the final record
    with pytest.raises(FormatError, match="LAST"):
        list(iter_ea_records(no_last))
    zero_len = bytearray(block)
    struct.pack_into(">I", zero_len, 24, 0)
    with pytest.raises(FormatError, match="rec_len"):
        list(iter_ea_records(zero_len))
    short = bytearray(block)
    struct.pack_into(">I", short, 24, 16)  # too small for its name and value
    with pytest.raises(FormatError, match="needs"):
        list(iter_ea_records(short))


@pytest.mark.timeout(10)
def test_pack_into_writes_only_the_struct() -> None:
    structures = [
        Superblock(4096, 12, Inum(3, 2072), Inum(16, 4656), "lock_nolock", ""),
        RindexEntry(17, 1, 18, 2056, 514),
        RgrpHeader(free=5, data0=18, data=2056, bitbytes=514),
        Dinode(formal=3, addr=2072, mode=0o40755),
        Leaf(depth=3, entries=2, inode=99),
    ]
    for structure in structures:
        buf = bytearray(b"\xee" * 600)
        structure.pack_into(buf, 100)
        raw = structure.pack()
        assert buf[100 : 100 + len(raw)] == raw
        assert buf[:100] == b"\xee" * 100 and buf[100 + len(raw) :] == b"\xee" * (500 - len(raw))


def names_in(block: bytes | bytearray, start: int, end: int) -> list[bytes]:
    return [d.name for _, d in live_dirents(block, start, end)]


@pytest.mark.timeout(10)
def test_add_and_remove_dirents_keep_the_tiling() -> None:
    from gfspy.ondisk.directory import add_dirent, remove_dirent

    block = bytearray(Leaf().pack_block(512))
    start, end = Leaf.SIZE, 512
    offsets = {}
    for i in range(8):
        name = f"n{i}".encode()
        offset = add_dirent(block, start, end, Dirent.make(name, Inum(i + 1, 100 + i), 8))
        assert offset is not None
        offsets[name] = offset
    # 408 bytes hold exactly eight 48-byte records; a ninth does not fit.
    assert add_dirent(block, start, end, Dirent.make(b"x", Inum(9, 9), 8)) is None
    assert offsets[b"n0"] == start  # the empty leaf's sentinel was reused in place
    remove_dirent(block, start, end, offsets[b"n3"])
    assert names_in(block, start, end) == [b"n0", b"n1", b"n2", b"n4", b"n5", b"n6", b"n7"]
    # The freed slack went to n2 and is found again by the next insert.
    assert add_dirent(block, start, end, Dirent.make(b"y", Inum(9, 9), 8)) == offsets[b"n3"]
    remove_dirent(block, start, end, start)  # first record becomes a sentinel
    first = next(iter_dirents(block, start, end))[1]
    assert first.is_sentinel() and first.rec_len == 48
    assert b"n0" not in names_in(block, start, end)
    with pytest.raises(FormatError, match="already unused"):
        remove_dirent(block, start, end, start)
    with pytest.raises(FormatError, match="no dirent"):
        remove_dirent(block, start, end, start + 8)
    assert add_dirent(block, start, end, Dirent.make(b"z", Inum(9, 9), 8)) == start


U16, U32, U64 = 2**16 - 1, 2**32 - 1, 2**64 - 1


@pytest.mark.timeout(10)
def test_extreme_field_values_survive() -> None:
    """Each field keeps its full width and signedness (no truncation, no overlap)."""
    dinode = Dinode(
        formal=U64,
        addr=U64 - 1,
        mode=U32,
        uid=U32 - 1,
        gid=U32 - 2,
        nlink=U32 - 3,
        size=U64 - 2,
        blocks=U64 - 3,
        atime=-(2**63),
        mtime=2**63 - 1,
        ctime=-1,
        major=U32 - 4,
        minor=U32 - 5,
        goal_meta=U64 - 4,
        goal_data=U64 - 5,
        generation=U64 - 6,
        flags=U32 - 6,
        payload_format=U32 - 7,
        height=U16,
        depth=U16 - 1,
        entries=U32 - 8,
        eattr=U64 - 7,
        atime_nsec=U32 - 9,
        mtime_nsec=U32 - 10,
        ctime_nsec=U32 - 11,
    )
    assert Dinode.unpack(dinode.pack()) == dinode
    header = LogHeader(
        U64, U32, U32 - 1, U32 - 2, U32 - 3, U64 - 1, U64 - 2, U64 - 3, U64 - 4, U64 - 5,
        -(2**63), 2**63 - 1, -1, jid=U32,
    )  # fmt: skip
    assert LogHeader.unpack(header.pack_block(512)) == header
    rgrp = RgrpHeader(U32, U32 - 1, U32 - 2, U32 - 3, U64, U64 - 1, U32 - 4, U32 - 5)
    assert RgrpHeader.unpack(rgrp.pack()) == rgrp
    leaf = Leaf(U16, U16 - 1, U32, U64, U64 - 1, U32 - 1, U32 - 2, U64 - 2)
    assert Leaf.unpack(leaf.pack()) == leaf
    dirent = Dirent(Inum(U64, U64 - 1), U32, U16, 255, U16 - 1, U16 - 2, b"n" * 255)
    assert Dirent.unpack(dirent.pack()) == dirent
    with pytest.raises(struct.error):
        Dinode(formal=U64 + 1, addr=1, mode=0).pack()


@pytest.mark.timeout(10)
def test_add_and_remove_ea_records_keep_the_chain() -> None:
    from gfspy.ondisk.xattr import add_ea_record, remove_ea_record

    def record(name: bytes, value: bytes) -> EARecord:
        return EARecord(0, len(value), len(name), C.EATYPE_USR, name=name, value=value)

    def names(block: bytearray) -> list[bytes]:
        return [r.name for _, r in iter_ea_records(block) if r.type != C.EATYPE_UNUSED]

    block = bytearray(new_ea_block(512))  # 488 bytes of records
    offsets = [add_ea_record(block, record(f"k{i}".encode(), b"v" * 70)) for i in range(5)]
    assert offsets == [24, 112, 200, 288, 376]  # 16 + 2 + 70 -> 88 bytes each
    assert add_ea_record(block, record(b"big", b"v" * 100)) is None
    records = [r for _, r in iter_ea_records(block)]
    assert [r.is_last for r in records] == [False] * 4 + [True]
    removed = remove_ea_record(block, 200)
    assert removed.name == b"k2" and names(block) == [b"k0", b"k1", b"k3", b"k4"]
    assert add_ea_record(block, record(b"new", b"w" * 60)) == 200  # k1's slack
    remove_ea_record(block, 376)  # the LAST record: its predecessor becomes LAST
    last = [r for _, r in iter_ea_records(block)][-1]
    assert last.name == b"k3" and last.is_last and last.rec_len == 512 - 288
    remove_ea_record(block, 24)  # the first record is marked unused in place
    first = next(iter_ea_records(block))[1]
    assert first.type == C.EATYPE_UNUSED and first.rec_len == 88
    with pytest.raises(FormatError, match="already unused"):
        remove_ea_record(block, 24)
    with pytest.raises(FormatError, match="no EA record"):
        remove_ea_record(block, 30)
    assert add_ea_record(block, record(b"again", b"x")) == 24
    assert names(block) == [b"again", b"k1", b"new", b"k3"]
