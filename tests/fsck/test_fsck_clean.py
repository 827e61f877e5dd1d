"""gfspy-fsck finds nothing wrong with what mkfs.gfs2 makes, across block sizes,
journal counts, sizes up to a 1 TiB sparse image and both lock protocols."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import Spec, mkfs, run_fsck, run_fsck_gfs2
from .corrupt import image_digest

# A covering matrix rather than the full cross product: every block size, every
# journal count, both lock protocols, and sizes from small to 1 TiB each appear.
# The 1 TiB image gets 32 MiB journals to keep the suite fast; with mkfs's default
# 512 MiB journal the check takes about 6 s on an idle 2-core machine.
MATRIX = [
    Spec(bsize=512, journals=1, size="64M", lockproto="lock_nolock"),
    Spec(bsize=1024, journals=8, size="300M", lockproto="lock_dlm", journal_mib=8),
    Spec(bsize=2048, journals=16, size="400M", lockproto="lock_dlm", journal_mib=8),
    Spec(bsize=4096, journals=2, size="10G", lockproto="lock_nolock"),
    Spec(bsize=4096, journals=1, size="1T", lockproto="lock_nolock", journal_mib=32),
    Spec(bsize=512, journals=2, size="2G", lockproto="lock_dlm"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("spec", MATRIX, ids=[s.id for s in MATRIX])
def test_mkfs_images_are_clean(spec: Spec, tmp_path: Path) -> None:
    image = mkfs(tmp_path / "gfs2.img", spec)
    # The oracle agrees the image is clean, so a complaint would be ours to fix.
    assert run_fsck_gfs2(image).returncode == 0
    before = image_digest(image)

    result = run_fsck("-n", image)

    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines == [f"{image}: clean, no problems found"], result.stdout
    assert result.stderr == ""
    assert image_digest(image) == before


@pytest.mark.timeout(60)
def test_verbose_reports_every_journal_clean(fresh_image: Path) -> None:
    before = image_digest(fresh_image)
    result = run_fsck("-n", "-v", fresh_image)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "journal0: clean (head at block" in result.stdout
    assert "journal1: clean (head at block" in result.stdout
    assert "3 resource groups" in result.stdout
    assert image_digest(fresh_image) == before


@pytest.mark.timeout(60)
def test_quiet_prints_nothing_on_a_clean_image(fresh_image: Path) -> None:
    result = run_fsck("-n", "-q", fresh_image)
    assert result.returncode == 0
    assert result.stdout == "" and result.stderr == ""
