"""gfspy-mkfs refuses bad requests with one line on stderr, a documented exit status,
and a device that is byte-for-byte unchanged."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .oracle import MIB, gfspy_mkfs, mkfs_gfs2, sha256, sparse_image

EXIT_FAILED = 1
EXIT_USAGE = 2


def _assert_refused(image: Path, args: list[str], status: int, *phrases: str) -> str:
    before = sha256(image)
    proc = gfspy_mkfs(*args)
    assert proc.returncode == status, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    assert sha256(image) == before
    return lines[0]


@pytest.mark.timeout(60)
def test_refuses_existing_gfs2_without_O(tmp_path: Path) -> None:
    """An image made by mkfs.gfs2 is detected and left alone."""
    image = sparse_image(tmp_path / "fs.img", 64 * MIB)
    assert mkfs_gfs2("-O", "-q", "-p", "lock_nolock", str(image)).returncode == 0
    _assert_refused(image, ["-p", "lock_nolock", str(image)], EXIT_FAILED, "existing gfs2", "-O")


@pytest.mark.timeout(60)
def test_refuses_existing_ext4_without_O(tmp_path: Path) -> None:
    image = sparse_image(tmp_path / "ext4.img", 64 * MIB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, timeout=60)
    _assert_refused(image, ["-p", "lock_nolock", str(image)], EXIT_FAILED, "ext2/ext3/ext4")


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("size", "args", "phrases"),
    [
        # Default journal size: 16 MiB per journal is the minimum, as in mkfs.gfs2.
        (15 * MIB, ["-p", "lock_nolock"], ["too small", "at least 16 MiB"]),
        (64 * MIB, ["-p", "lock_nolock", "-j", "5"], ["too small", "5 journal", "at least 80 MiB"]),
        # Explicit journal size: the journals may take at most half the device.
        (64 * MIB, ["-p", "lock_nolock", "-j", "2", "-J", "20"], ["at least 80 MiB", "16 MiB"]),
        # BLOCKS larger than the device.
        (64 * MIB, ["-p", "lock_nolock", "DEVICE", "99999999"], ["bigger than the device"]),
    ],
)
def test_refuses_a_device_too_small(
    tmp_path: Path, size: int, args: list[str], phrases: list[str]
) -> None:
    image = sparse_image(tmp_path / "small.img", size)
    args = [str(image) if a == "DEVICE" else a for a in args]
    if str(image) not in args:
        args.append(str(image))
    _assert_refused(image, args, EXIT_FAILED, *phrases)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("table", "phrase"),
    [
        ("nocolon", "missing colon"),
        ("a:b:c", "more than one colon"),
        (":fs", "cluster name must be 1-32"),
        ("c" * 33 + ":fs", "cluster name must be 1-32"),
        ("cluster:", "filesystem name must be 1-30"),
        ("cluster:" + "f" * 31, "filesystem name must be 1-30"),
        ("clu ster:fs", "not allowed"),
        ("cluster:f/s", "not allowed"),
    ],
)
def test_refuses_malformed_lock_table(tmp_path: Path, table: str, phrase: str) -> None:
    image = sparse_image(tmp_path / "fs.img", 64 * MIB)
    _assert_refused(image, ["-p", "lock_dlm", "-t", table, str(image)], EXIT_USAGE, phrase)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["-p", "lock_dlm"], "needs a lock table"),
        (["-p", "lock_gulm", "-t", "a:b"], "invalid lock protocol"),
        (["-p", "lock_nolock", "-b", "3000"], "power of two"),
        (["-p", "lock_nolock", "-b", "8192"], "512-4096"),
        (["-p", "lock_nolock", "-b", "256"], "512-4096"),
        (["-p", "lock_nolock", "-j", "0"], "journals"),
        (["-p", "lock_nolock", "-j", "two"], "whole number"),
        (["-p", "lock_nolock", "-J", "4"], "journal size"),
        (["-p", "lock_nolock", "-J", "2048"], "journal size"),
        (["-p", "lock_nolock", "-r", "16"], "resource group size"),
        (["-p", "lock_nolock", "-c", "0"], "quota change size"),
        (["-p", "lock_nolock", "-U", "not-a-uuid"], "invalid UUID"),
        (["-p", "lock_nolock", "--frobnicate"], "unrecognized"),
    ],
)
def test_refuses_bad_options(tmp_path: Path, args: list[str], phrase: str) -> None:
    image = sparse_image(tmp_path / "fs.img", 64 * MIB)
    _assert_refused(image, [*args, str(image)], EXIT_USAGE, phrase)


@pytest.mark.timeout(30)
def test_refuses_missing_device(tmp_path: Path) -> None:
    proc = gfspy_mkfs("-p", "lock_nolock")
    assert proc.returncode == EXIT_USAGE
    assert len(proc.stderr.splitlines()) == 1 and "DEVICE" in proc.stderr
    missing = tmp_path / "nope.img"
    proc = gfspy_mkfs("-p", "lock_nolock", str(missing))
    assert proc.returncode == EXIT_FAILED
    assert len(proc.stderr.splitlines()) == 1 and "No such file" in proc.stderr
    assert not missing.exists()
    proc = gfspy_mkfs("-p", "lock_nolock", str(tmp_path))
    assert proc.returncode == EXIT_FAILED
    assert (
        len(proc.stderr.splitlines()) == 1 and "not a regular file or block device" in proc.stderr
    )
