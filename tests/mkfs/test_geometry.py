"""The pure layout rules, against figures read off real mkfs.gfs2 images
(reference/gfs2-format.md §6.2-6.3)."""

from __future__ import annotations

import pytest

from gfspy.mkfs.geometry import (
    GeometryError,
    compute_layout,
    default_journal_blocks,
    plan_rgrp_lengths,
    rgsize_for_data,
    space_for_data,
    split_rgrp,
)
from gfspy.ondisk.constants import Geometry

MIB = 1 << 20


@pytest.mark.timeout(10)
def test_reference_image_layout() -> None:
    """256 MiB, two 8 MiB journals: rgrps at 17, 2074, 4131; block 65535 unused."""
    layout = compute_layout(device_bytes=256 * MIB, bsize=4096, journals=2)
    spans = [(rg.addr, rg.length, rg.data0, rg.data, rg.skip) for rg in layout.rgrps]
    assert spans == [
        (17, 1, 18, 2056, 2057),
        (2074, 1, 2075, 2056, 2057),
        (4131, 4, 4135, 61400, 0),
    ]
    assert layout.journal_mb == 8
    assert layout.journal_file_blocks == 2054  # 2048 log + 5 indirect + dinode
    assert layout.fs_size == 65535
    assert layout.data_blocks == 65512  # the statfs total of the reference image


@pytest.mark.timeout(10)
def test_ten_gib_uses_two_rgrp_lengths() -> None:
    """10 GiB, two journals: 32 MiB journals in 8213-block rgrps, then 36 rgrps spaced
    65125 blocks and 4 spaced 65124."""
    layout = compute_layout(device_bytes=10 << 30, bsize=4096, journals=2)
    assert layout.journal_mb == 32
    assert [rg.skip for rg in layout.journal_rgrps] == [8213, 8213]
    data_rgrps = layout.rgrps[2:]
    skips = [rg.skip for rg in data_rgrps]
    # The fourth 65124-block rgrp is the last one, whose rg_skip is 0.
    assert skips.count(65125) == 36 and skips.count(65124) == 3 and skips[-1] == 0
    assert len(data_rgrps) == 40
    assert {rg.length for rg in data_rgrps} == {5}
    assert {rg.data for rg in data_rgrps} == {65120, 65116}


@pytest.mark.timeout(10)
def test_rgrp_bitmap_always_covers_its_data() -> None:
    for bsize in (512, 1024, 2048, 4096):
        in_rg, in_rb = 4 * (bsize - 128), 4 * (bsize - 24)
        for total in (33, 1000, 2057, 16669, 61404, 65536, 524288):
            length, data = split_rgrp(bsize, total)
            assert data % 4 == 0 and length + data <= total
            assert in_rg + in_rb * (length - 1) >= data  # fsck's capacity check


@pytest.mark.timeout(10)
def test_file_and_journal_sizes() -> None:
    g4k, g512 = Geometry.for_bsize(4096), Geometry.for_bsize(512)
    assert space_for_data(g4k, 100) == 1  # stuffed
    assert space_for_data(g4k, 8 * MIB) == 2054
    assert space_for_data(g512, 8 * MIB) == 16384 + 269 + 5 + 1
    assert rgsize_for_data(2054, 4096) == 2057
    assert rgsize_for_data(16659, 512) == 16669  # 9 header blocks, as mkfs.gfs2 makes
    assert default_journal_blocks(4096, 4095) is None
    assert default_journal_blocks(4096, 4096) == 2048
    assert default_journal_blocks(4096, 268435456) == 131072  # 1 TiB: 512 MiB


@pytest.mark.timeout(10)
def test_plan_fills_the_space_within_one_block_per_rgrp() -> None:
    for space, target in ((61405, 65536), (10 << 18, 65536), (3_000_000, 8192), (65536 * 7, 65536)):
        plan = plan_rgrp_lengths(space, target)
        used = sum(length * count for length, count in plan)
        rgrps = sum(count for _, count in plan)
        assert used <= space
        assert space - used <= max(1, rgrps)
        assert max(length for length, count in plan if count) <= target


@pytest.mark.timeout(10)
def test_too_small_devices_are_refused_with_the_needed_size() -> None:
    with pytest.raises(GeometryError, match="at least 16 MiB"):
        compute_layout(device_bytes=15 * MIB, journals=1)
    with pytest.raises(GeometryError, match="at least 64 MiB"):
        compute_layout(device_bytes=60 * MIB, journals=4)
    with pytest.raises(GeometryError, match="at least 160 MiB"):
        compute_layout(device_bytes=100 * MIB, journals=2, journal_mb=40)
    compute_layout(device_bytes=16 * MIB, journals=1)  # the smallest that fits
