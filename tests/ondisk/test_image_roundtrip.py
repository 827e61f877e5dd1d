"""Every structure of real mkfs.gfs2 images decodes and re-encodes byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest

from gfspy.ondisk.constants import LH_UNMOUNT, LH_USERSPACE, SB_OFFSET
from gfspy.ondisk.inum import InumRange, unpack_next_inum
from gfspy.ondisk.quota import QuotaEntry
from gfspy.ondisk.statfs import StatfsChange
from gfspy.ondisk.superblock import Superblock

from .conftest import IMAGE_SPECS, ImageFactory, ImageSpec
from .imagewalk import walk_image


@pytest.mark.timeout(120)
@pytest.mark.parametrize("spec", IMAGE_SPECS, ids=lambda spec: spec.ident)
def test_whole_image_round_trips(spec: ImageSpec, gfs2_image_factory: ImageFactory) -> None:
    image = gfs2_image_factory(spec)
    result = walk_image(image)
    sb = result.sb
    assert (sb.bsize, sb.lockproto, sb.locktable) == (spec.bsize, spec.lockproto, spec.locktable)

    # The system tree mkfs builds, reached through our dirent decoder.
    expected_paths = {
        "master",
        "master/jindex",
        "master/per_node",
        "master/inum",
        "master/statfs",
        "master/rindex",
        "master/quota",
        "root",
    }
    for j in range(spec.journals):
        expected_paths |= {
            f"master/jindex/journal{j}",
            f"master/per_node/inum_range{j}",
            f"master/per_node/statfs_change{j}",
            f"master/per_node/quota_change{j}",
        }
    assert set(result.paths) == expected_paths

    # Every class of block was actually seen, not silently skipped.
    counts = result.counts
    assert counts["SB"] == 1 and counts["DI"] == len(expected_paths)
    assert counts["RG"] == len(result.rgrps) >= 1
    assert counts["IN"] >= spec.journals  # journals are height >= 2 trees
    assert counts["QC"] == spec.journals * (1 << 20) // spec.bsize
    journal_blocks = sum(
        result.dinodes[result.paths[f"master/jindex/journal{j}"]].size // spec.bsize
        for j in range(spec.journals)
    )
    assert counts["LH"] == journal_blocks

    # System-file contents agree with the rgrps they summarise.
    statfs = StatfsChange.unpack(result.files["master/statfs"])
    assert statfs.total == sum(info.entry.data for info in result.rgrps)
    assert statfs.free == sum(info.header.free for info in result.rgrps)
    assert statfs.dinodes == sum(info.header.dinodes for info in result.rgrps)
    assert statfs.dinodes == len(result.dinodes)
    for j in range(spec.journals):
        assert StatfsChange.unpack(result.files[f"master/per_node/statfs_change{j}"]) == (
            StatfsChange()
        )
        assert InumRange.unpack(result.files[f"master/per_node/inum_range{j}"]) == InumRange()
        head = result.journal_heads[f"master/jindex/journal{j}"]
        assert head.flags == LH_UNMOUNT | LH_USERSPACE
    highest_formal = max(di.formal for di in result.dinodes.values())
    assert unpack_next_inum(result.files["master/inum"]) == highest_formal + 1
    quota = result.files["master/quota"]
    root_user, root_group = QuotaEntry.unpack(quota, 0), QuotaEntry.unpack(quota, 88)
    assert root_user.value == root_group.value == 1


@pytest.mark.timeout(60)
def test_reference_layout_matches(gfs2_image_factory: ImageFactory) -> None:
    """The 256 MiB, 2-journal image has the exact addresses the reference lists."""
    image = gfs2_image_factory(IMAGE_SPECS[0])
    result = walk_image(image)
    assert result.sb.master_dir.addr == 2072 and result.sb.master_dir.formal == 3
    assert result.sb.root_dir.addr == 4656 and result.sb.root_dir.formal == 16
    layout = [(i.entry.addr, i.entry.length, i.entry.data0, i.entry.data) for i in result.rgrps]
    assert layout == [(17, 1, 18, 2056), (2074, 1, 2075, 2056), (4131, 4, 4135, 61400)]
    assert [i.header.skip for i in result.rgrps] == [2057, 2057, 0]
    assert result.paths["master/rindex"] == 4654
    assert result.dinodes[result.paths["master/jindex/journal0"]].blocks == 2054


@pytest.mark.timeout(30)
def test_superblock_fields(gfs2_image: Path) -> None:
    with open(gfs2_image, "rb") as image:
        image.seek(SB_OFFSET)
        raw = image.read(512)
    sb = Superblock.unpack(raw)
    assert sb.fs_format == 1802 and sb.multihost_format == 1900
    assert 1 << sb.bsize_shift == sb.bsize
    assert sb.uuid.int != 0
    assert sb.pack() == raw[: Superblock.SIZE]
