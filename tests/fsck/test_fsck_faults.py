"""One corruption at a time on a fresh mkfs.gfs2 image: gfspy-fsck must exit 4 and
name the fault and the block or inode, fsck.gfs2 -n must agree the image is damaged
(so the injection is real), and the image must be byte-identical afterwards."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from gfspy.ondisk.journal import LogHeader

from .conftest import run_fsck_gfs2, run_fsck_here
from .corrupt import Image, image_digest


@dataclass(frozen=True)
class Fault:
    """A corruption, what gfspy-fsck must print for it, and fsck.gfs2's verdict."""

    name: str
    inject: Callable[[Image], int]
    #: Regex our output must match; "{block}" is replaced by the touched block.
    expect: str
    #: Regex fsck.gfs2 -n must print, or None when a non-zero exit suffices.
    oracle: str | None = None


FAULTS = [
    Fault(
        "rg_free",
        lambda im: im.add_rg_free(2, -1),
        r"^rgrp {block}: rg_free is 60877 but the bitmap has 60878 free blocks$",
        r"free count inconsistent",
    ),
    Fault(
        "bitmap_free_block_marked_used",
        lambda im: im.mark_free_block_used(),
        r"^block {block}: bitmap says data but the check found it free \(no inode owns it\)$",
        r"bitmap says 1 \(data\) but FSCK saw 0 \(free\)",
    ),
    Fault(
        "dirent_hash_in_master",
        lambda im: im.break_dirent_hash(im.sb.master_dir.addr, b"quota"),
        r"^inode {block} \(master\) offset \d+: entry 'quota' has hash 0x6c1d0fed, "
        r"expected 0x6c1c0fed$",
    ),
    Fault(
        "root_nlink",
        lambda im: im.add_nlink(im.sb.root_dir.addr, 1),
        r"^inode {block} \(root\): link count is 3 but 2 directory entries name it$",
        r"Link count inconsistent for inode \d+ \(0x[0-9a-f]+\) has 3 but fsck found 2",
    ),
    Fault(
        "system_inode_nlink",
        lambda im: im.add_nlink(im.system("jindex"), -1),
        r"^inode {block} \(jindex\): link count is 1 but 2 directory entries name it$",
        r"Link count inconsistent",
    ),
    Fault(
        "journal_di_blocks",
        lambda im: im.add_di_blocks(im.system("journal0"), 1),
        r"^inode {block} \(journal0\): di_blocks is 2055 but the inode owns 2054 blocks$",
        r"Ondisk block count \(2055\) does not match what fsck found \(2054\)",
    ),
    Fault(
        "statfs_total",
        lambda im: im.add_statfs_total(1),
        r"^inode {block} \(statfs\): statfs total is 65513 but the resource groups have 65512$",
        r"The statfs file is wrong",
    ),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_single_field_corruption_is_named(fault: Fault, fresh_image: Path) -> None:
    block = fault.inject(Image(fresh_image))
    oracle = run_fsck_gfs2(fresh_image)
    assert oracle.returncode != 0, "fsck.gfs2 did not notice: the injection is not real"
    if fault.oracle:
        assert re.search(fault.oracle, oracle.stdout + oracle.stderr), oracle.stdout
    before = image_digest(fresh_image)

    result = run_fsck_here("-n", fresh_image)

    assert result.returncode == 4, result.stdout + result.stderr
    pattern = fault.expect.replace("{block}", str(block))
    assert re.search(pattern, result.stdout, re.M), f"{pattern!r} not in:\n{result.stdout}"
    assert re.search(r"problem\(s\) found, not corrected", result.stdout)
    assert image_digest(fresh_image) == before


@pytest.mark.timeout(60)
def test_bad_lh_crc_names_journal_block(fresh_image: Path) -> None:
    image = Image(fresh_image)
    block = image.break_lh_crc(0, 5)
    # fsck.gfs2 3.5.0 only reads the headers its binary search visits, so it does
    # not notice a bad lh_crc elsewhere; the ondisk decoder is the oracle instead.
    assert not LogHeader.verify(image.read(block))
    before = image_digest(fresh_image)

    result = run_fsck_here("-n", fresh_image)

    assert result.returncode == 4, result.stdout + result.stderr
    assert re.search(
        rf"^journal0 block {block}: log header at journal block 5: bad lh_crc 0x[0-9a-f]{{8}}, "
        r"expected 0x[0-9a-f]{8}$",
        result.stdout,
        re.M,
    ), result.stdout
    assert image_digest(fresh_image) == before


@pytest.mark.timeout(60)
def test_dirty_journal_is_an_error(fresh_image: Path) -> None:
    head_block, seq = Image(fresh_image).make_journal_dirty(1)
    oracle = run_fsck_gfs2(fresh_image)
    # fsck.gfs2 -n notes the dirty journal yet exits 0; gfspy-fsck counts it.
    assert 'Journal #2 ("journal1") is dirty' in oracle.stdout + oracle.stderr
    before = image_digest(fresh_image)

    result = run_fsck_here("-n", fresh_image)

    assert result.returncode == 4, result.stdout + result.stderr
    assert f"journal1: dirty (head at block {head_block}, seq {seq}); replay needed" in (
        result.stdout.splitlines()
    )
    assert "journal0" not in result.stdout
    assert image_digest(fresh_image) == before


@pytest.mark.timeout(60)
def test_several_faults_are_all_reported(fresh_image: Path) -> None:
    image = Image(fresh_image)
    root = image.add_nlink(image.sb.root_dir.addr, 5)
    rgrp = image.add_rg_free(0, 3)
    before = image_digest(fresh_image)

    result = run_fsck_here("-n", fresh_image)

    assert result.returncode == 4
    assert re.search(rf"^inode {root} \(root\): link count is 7", result.stdout, re.M)
    assert re.search(rf"^rgrp {rgrp}: rg_free is 3 but the bitmap has 0", result.stdout, re.M)
    assert "2 problem(s) found" in result.stdout
    assert image_digest(fresh_image) == before


@pytest.mark.timeout(60)
def test_statfs_change_left_over_on_a_clean_journal(fresh_image: Path) -> None:
    """fsck.gfs2 ignores statfs_change files, but the kernel would fold these deltas
    into the totals again at the next mount, so a clean image must have none."""
    block = Image(fresh_image).set_statfs_change(1, 0, -5, 2)
    before = image_digest(fresh_image)

    result = run_fsck_here("-n", fresh_image)

    assert result.returncode == 4, result.stdout + result.stderr
    assert result.stdout.splitlines()[0] == (
        f"inode {block} (statfs_change1): holds unapplied deltas (total 0, free -5, "
        "dinodes 2) although journal1 is clean"
    )
    assert image_digest(fresh_image) == before
