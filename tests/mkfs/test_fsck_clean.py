"""fsck.gfs2 -n finds nothing wrong with images made by gfspy-mkfs.

The matrix covers every block size (512/1024/2048/4096), journal count (1/2/8/16),
both lock protocols and sizes from the smallest mkfs.gfs2 accepts (16 MiB per journal)
to a 1 TiB sparse image, without the full cross product.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest

from .oracle import MIB, fsck_complaints, gfspy_mkfs, sha256, sparse_image, tunegfs2_list

TIB = 1 << 40

# (block size, journals, device bytes, lock protocol, lock table)
MATRIX = [
    (4096, 1, 16 * MIB, "lock_nolock", None),  # smallest device mkfs.gfs2 accepts
    (512, 1, 16 * MIB, "lock_dlm", "tiny:fs"),  # smallest, smallest blocks
    (512, 8, 300 * MIB, "lock_dlm", "alpha:data"),  # hashed master/jindex/per_node
    (1024, 16, 256 * MIB, "lock_nolock", None),  # 16 journals of 8 MiB, hashed dirs
    (2048, 2, 96 * MIB, "lock_dlm", "c2048:fs_2"),
    (4096, 8, 2 << 30, "lock_dlm", "big-cluster:fs-name"),  # 32 MiB journals
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("bsize", "journals", "size", "proto", "table"), MATRIX)
def test_fsck_finds_nothing(
    tmp_path: Path, bsize: int, journals: int, size: int, proto: str, table: str | None
) -> None:
    image = sparse_image(tmp_path / "fs.img", size)
    args = ["-q", "-b", str(bsize), "-j", str(journals), "-p", proto]
    if table:
        args += ["-t", table]
    made = gfspy_mkfs(*args, str(image))
    assert made.returncode == 0, made.stderr
    assert made.stdout == "" and made.stderr == ""  # -q prints nothing
    status, complaints = fsck_complaints(image)
    assert status == 0 and complaints == [], complaints


@pytest.mark.timeout(180)
def test_one_tebibyte_sparse_image_is_clean_and_labelled(tmp_path: Path) -> None:
    """The largest case: 4095 resource groups and a 512 MiB journal (mkfs.gfs2's
    default for this size), with lock_dlm, checked by fsck and read back by tunegfs2."""
    image = sparse_image(tmp_path / "big.img", TIB)
    fs_uuid = str(uuid.uuid4())
    made = gfspy_mkfs("-p", "lock_dlm", "-t", "tera:bytes", "-U", fs_uuid, str(image), timeout=120)
    assert made.returncode == 0, made.stderr
    assert "Resource groups:           4095" in made.stdout
    assert "Journal size:              512MB" in made.stdout
    # A device this big reports progress on stderr even when it is not a terminal.
    assert "Writing resource groups: 4095/4095" in made.stderr
    status, complaints = fsck_complaints(image, timeout=150)
    assert status == 0 and complaints == [], complaints
    info = tunegfs2_list(image)
    assert info["Lock table"] == "tera:bytes"
    assert info["File system UUID"] == fs_uuid


@pytest.mark.timeout(60)
def test_tunegfs2_reports_lock_settings_and_uuid(tmp_path: Path) -> None:
    image = sparse_image(tmp_path / "fs.img", 64 * MIB)
    fs_uuid = "0b3e7a3c-5d2a-4c61-9a8e-2f4c1d6b7e90"
    made = gfspy_mkfs("-q", "-p", "lock_dlm", "-t", "prod:shared_01", "-U", fs_uuid, str(image))
    assert made.returncode == 0, made.stderr
    info = tunegfs2_list(image)
    assert info["Lock protocol"] == "lock_dlm"
    assert info["Lock table"] == "prod:shared_01"
    assert info["File system UUID"] == fs_uuid
    assert info["File system format version"] == "1802"


@pytest.mark.timeout(60)
def test_overwrite_with_O_replaces_an_existing_filesystem(tmp_path: Path) -> None:
    image = sparse_image(tmp_path / "fs.img", 64 * MIB)
    first = gfspy_mkfs("-q", "-p", "lock_nolock", "-U", str(uuid.uuid4()), str(image))
    assert first.returncode == 0, first.stderr
    new_uuid = str(uuid.uuid4())
    second = gfspy_mkfs("-O", "-q", "-p", "lock_dlm", "-t", "c:again", "-U", new_uuid, str(image))
    assert second.returncode == 0, second.stderr
    assert tunegfs2_list(image)["File system UUID"] == new_uuid
    status, complaints = fsck_complaints(image)
    assert status == 0 and complaints == [], complaints


@pytest.mark.timeout(90)
def test_fsck_repair_mode_changes_nothing(tmp_path: Path) -> None:
    """fsck.gfs2 -y (which rewrites whatever it disagrees with) leaves the image
    byte-identical: hashed directories, bitmaps and statfs are exactly what it wants."""
    image = sparse_image(tmp_path / "fs.img", 128 * MIB)
    made = gfspy_mkfs("-q", "-b", "512", "-j", "4", "-p", "lock_dlm", "-t", "rep:air", str(image))
    assert made.returncode == 0, made.stderr
    before = sha256(image)
    proc = subprocess.run(
        ["fsck.gfs2", "-y", str(image)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sha256(image) == before
