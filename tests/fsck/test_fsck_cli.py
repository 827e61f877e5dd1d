"""The command line: operational errors (exit 8), usage errors (exit 16), repair
flags refused without touching the device, and one clear line on stderr each time."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest

from .conftest import run_fsck
from .corrupt import image_digest


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("gfspy-fsck: ")
    return lines[0]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", ["200M", "12M", "100K"])
def test_truncated_image_is_an_operational_error(fresh_image: Path, size: str) -> None:
    subprocess.run(["truncate", "-s", size, str(fresh_image)], check=True)
    before = image_digest(fresh_image)
    result = run_fsck("-n", fresh_image)
    assert result.returncode == 8
    assert "truncated image?" in _one_line_error(result)
    assert result.stdout == ""
    assert image_digest(fresh_image) == before


@pytest.mark.timeout(60)
def test_garbage_is_not_gfs2(tmp_path: Path) -> None:
    image = tmp_path / "garbage.img"
    image.write_bytes(random.Random(1802).randbytes(8 << 20))
    before = image_digest(image)
    result = run_fsck("-n", image)
    assert result.returncode == 8
    assert _one_line_error(result) == (
        f"gfspy-fsck: {image}: not a GFS2 filesystem (no superblock at byte 65536)"
    )
    assert image_digest(image) == before


@pytest.mark.timeout(60)
def test_ext4_image_is_not_gfs2(tmp_path: Path) -> None:
    image = tmp_path / "ext4.img"
    subprocess.run(["truncate", "-s", "64M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    before = image_digest(image)
    result = run_fsck("-n", image)
    assert result.returncode == 8
    assert "not a GFS2 filesystem" in _one_line_error(result)
    assert image_digest(image) == before


@pytest.mark.timeout(60)
def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such.img"
    result = run_fsck("-n", missing)
    assert result.returncode == 8
    assert _one_line_error(result) == (
        f"gfspy-fsck: cannot open {missing}: No such file or directory"
    )
    assert not missing.exists()


@pytest.mark.timeout(60)
def test_directory_is_not_a_device(tmp_path: Path) -> None:
    result = run_fsck("-n", tmp_path)
    assert result.returncode == 8
    assert "not a regular file or block device" in _one_line_error(result)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("flag", ["-y", "-p", "-a"])
def test_repair_flags_are_refused_without_touching_the_device(fresh_image: Path, flag: str) -> None:
    before = image_digest(fresh_image)
    mtime = os.stat(fresh_image).st_mtime_ns
    result = run_fsck(flag, fresh_image)
    assert result.returncode == 16
    assert "repair" in _one_line_error(result) and "not available yet" in result.stderr
    assert result.stdout == ""
    assert image_digest(fresh_image) == before
    assert os.stat(fresh_image).st_mtime_ns == mtime


@pytest.mark.timeout(60)
@pytest.mark.parametrize("argv", [[], ["-n"], ["--bogus", "x.img"], ["a.img", "b.img"]])
def test_usage_errors(argv: list[str]) -> None:
    result = run_fsck(*argv)
    assert result.returncode == 16
    assert "see --help" in _one_line_error(result)


@pytest.mark.timeout(60)
def test_help_documents_exit_codes_and_dirty_journals() -> None:
    result = run_fsck("--help")
    assert result.returncode == 0
    for text in ("exit status", "  0 ", "  4 ", "  8 ", "  16 ", "dirty", "fsck.gfs2 -n", "-y"):
        assert text in result.stdout, text
