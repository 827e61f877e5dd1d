"""Bitmap helpers against a naive per-block model."""

from __future__ import annotations

import random

import pytest

from gfspy.ondisk.constants import DINODE, FREE, UNLINKED, USED
from gfspy.ondisk.errors import FormatError
from gfspy.ondisk.rgrp import (
    RgrpHeader,
    bitmap_blocks_needed,
    bitmap_capacity,
    count_states,
    extract_bitmap,
    find_state,
    get_state,
    pack_rgrp_blocks,
    set_state,
    split_bitmap,
)


def naive_states(bitmap: bytes, ndata: int) -> list[int]:
    return [(bitmap[n // 4] >> (2 * (n % 4))) & 3 for n in range(ndata)]


def random_bitmap(rng: random.Random, ndata: int) -> bytearray:
    bitmap = bytearray(rng.randbytes((ndata + 3) // 4))
    return bitmap


@pytest.mark.timeout(10)
def test_state_position_is_lsb_first() -> None:
    # Reference example: byte 0x57 = block 0 DINODE, blocks 1..3 USED.
    bitmap = bytes([0x57])
    assert [get_state(bitmap, n) for n in range(4)] == [DINODE, USED, USED, USED]
    bitmap = bytes([0xF5])
    assert [get_state(bitmap, n) for n in range(4)] == [USED, USED, DINODE, DINODE]


@pytest.mark.timeout(10)
def test_set_state_touches_only_its_block() -> None:
    rng = random.Random(1)
    bitmap = random_bitmap(rng, 400)
    for _ in range(2000):
        n = rng.randrange(400)
        state = rng.randrange(4)
        before = naive_states(bytes(bitmap), 400)
        set_state(bitmap, n, state)
        before[n] = state
        assert naive_states(bytes(bitmap), 400) == before
    with pytest.raises(ValueError):
        set_state(bitmap, 0, 4)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("ndata", [0, 1, 3, 4, 5, 1023, 15872, 61400])
def test_count_states_matches_naive(ndata: int) -> None:
    rng = random.Random(ndata)
    bitmap = random_bitmap(rng, ndata)
    # Garbage past ndata in the last byte must not be counted.
    bitmap += b"\xff\xff"
    states = naive_states(bytes(bitmap), ndata)
    expected = tuple(states.count(s) for s in (FREE, USED, UNLINKED, DINODE))
    assert count_states(bitmap, ndata) == expected
    assert count_states(memoryview(bytes(bitmap)), ndata) == expected


@pytest.mark.timeout(10)
def test_count_states_refuses_short_bitmap() -> None:
    with pytest.raises(FormatError):
        count_states(bytes(2), 9)


@pytest.mark.timeout(30)
def test_find_state_matches_naive() -> None:
    rng = random.Random(7)
    ndata = 5000
    # Sparse matches so the byte scan has to skip long runs.
    bitmap = bytearray(b"\x55" * ((ndata + 3) // 4))  # all USED
    for n in rng.sample(range(ndata), 30):
        set_state(bitmap, n, rng.choice([FREE, DINODE, UNLINKED]))
    states = naive_states(bytes(bitmap), ndata)
    for state in (FREE, USED, UNLINKED, DINODE):
        for start in [0, 1, 2, 3, 4, 17, 2500, 4999, 5000]:
            expected = next((n for n in range(start, ndata) if states[n] == state), None)
            assert find_state(bitmap, state, start, ndata) == expected, (state, start)


@pytest.mark.timeout(10)
def test_find_state_ignores_blocks_past_ndata() -> None:
    bitmap = bytearray(b"\x55\x55")  # 8 blocks USED
    set_state(bitmap, 6, FREE)
    assert find_state(bitmap, FREE, 0, 6) is None
    assert find_state(bitmap, FREE, 0, 7) == 6


@pytest.mark.timeout(10)
@pytest.mark.parametrize("bsize", [512, 1024, 2048, 4096])
def test_capacity_and_blocks_needed_agree(bsize: int) -> None:
    assert bitmap_capacity(bsize, 1) == 4 * (bsize - 128)
    assert bitmap_capacity(bsize, 2) == 4 * (bsize - 128) + 4 * (bsize - 24)
    for data in [1, 4 * (bsize - 128), 4 * (bsize - 128) + 1, 61400, 65120, 200000]:
        length = bitmap_blocks_needed(bsize, data)
        assert bitmap_capacity(bsize, length) >= data
        assert length == 1 or bitmap_capacity(bsize, length - 1) < data
    # The reference image's big rgrp: 61400 data blocks need 4 header blocks.
    assert bitmap_blocks_needed(4096, 61400) == 4


@pytest.mark.timeout(10)
@pytest.mark.parametrize("bsize", [512, 4096])
def test_split_and_extract_are_inverse(bsize: int) -> None:
    rng = random.Random(bsize)
    length = 5
    bitbytes = (bitmap_capacity(bsize, length) // 4) - 37
    bitmap = bytearray(rng.randbytes(bitbytes))
    parts = split_bitmap(bitmap, bsize, length)
    assert [len(p) for p in parts] == [bsize - 128] + [bsize - 24] * 4
    header = RgrpHeader(free=1, data0=100, data=bitbytes * 4, bitbytes=bitbytes)
    blocks = pack_rgrp_blocks(header, bitmap, bsize, length)
    assert all(len(b) == bsize for b in blocks)
    assert extract_bitmap(blocks, bsize, bitbytes) == bitmap
    with pytest.raises(FormatError):
        split_bitmap(bytes(bitmap_capacity(bsize, length) // 4 + 1), bsize, length)
    with pytest.raises(FormatError):
        extract_bitmap(blocks[:2], bsize, bitbytes)
