"""gfspy-mkfs lays out a device exactly as mkfs.gfs2 3.5.0 does with the same options.

Both tools make an image of the same size; gfs2_edit reads both. Compared: every rindex
entry (mkfs.gfs2 leaves junk in the pad bytes, which gfs2_edit does not show), the
superblock's master and root addresses, the journal dinodes, and the block of every
system dinode, including the per_node files and the hashed directories that small
blocks and many journals force. Our image must also pass fsck.gfs2 -n.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .oracle import (
    MIB,
    dir_entries,
    fsck_complaints,
    gfspy_mkfs,
    mkfs_gfs2,
    rindex,
    sparse_image,
    system_inode_map,
)

CONFIGS = [
    # (device bytes, options)
    (256 * MIB, ["-p", "lock_dlm", "-t", "c:fs", "-j", "2"]),  # the reference image
    (300 * MIB, ["-p", "lock_nolock", "-b", "512", "-j", "8"]),  # hashed dirs, split leaves
    (
        480 * MIB,
        ["-p", "lock_nolock", "-b", "512", "-j", "30"],
    ),  # per_node table doubled into JD blocks
    (512 * MIB, ["-p", "lock_nolock", "-b", "2048", "-j", "16"]),  # rindex unstuffed early
    (600 * MIB, ["-p", "lock_dlm", "-t", "a:b", "-j", "3", "-J", "20", "-r", "32"]),
    (3 << 30, ["-p", "lock_nolock", "-b", "1024", "-j", "5", "-r", "33", "-c", "2"]),
    (20 * MIB, ["-p", "lock_nolock"]),  # uneven tail, smallest sizes
    (5 << 30, ["-p", "lock_nolock", "-j", "2"]),  # default 32 MiB journals, two rgrp lengths
]


def _make_both(tmp_path: Path, size: int, options: list[str]) -> tuple[Path, Path]:
    theirs = sparse_image(tmp_path / "mkfs_gfs2.img", size)
    ours = sparse_image(tmp_path / "gfspy.img", size)
    ref = mkfs_gfs2("-O", "-q", *options, str(theirs))
    assert ref.returncode == 0, ref.stderr
    made = gfspy_mkfs("-O", "-q", *options, str(ours))
    assert made.returncode == 0, made.stderr
    return theirs, ours


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("size", "options"), CONFIGS, ids=lambda v: str(v))
def test_layout_matches_mkfs_gfs2(tmp_path: Path, size: int, options: list[str]) -> None:
    theirs, ours = _make_both(tmp_path, size, options)
    assert rindex(ours) == rindex(theirs)
    their_inodes = system_inode_map(theirs)
    our_inodes = system_inode_map(ours)
    assert our_inodes == their_inodes
    # The superblock's two inums and the journals are part of that map; make sure the
    # map really had them, so an empty parse cannot pass.
    journals = int(options[options.index("-j") + 1]) if "-j" in options else 1
    assert {"root", "master", "jindex", "per_node", "rindex"} <= set(our_inodes)
    assert sum(name.startswith("jindex/journal") for name in our_inodes) == journals
    assert sum(name.startswith("per_node/") for name in our_inodes) == 3 * journals
    status, complaints = fsck_complaints(ours)
    assert status == 0 and complaints == [], complaints


@pytest.mark.timeout(60)
def test_formal_inode_numbers_match_mkfs_gfs2(tmp_path: Path) -> None:
    """Directory entries carry the same formal numbers (journals first, root last)."""
    theirs, ours = _make_both(tmp_path, 128 * MIB, ["-p", "lock_nolock", "-j", "4"])
    for directory in ("master", "jindex", "per_node"):
        assert dir_entries(ours, directory) == dir_entries(theirs, directory)
