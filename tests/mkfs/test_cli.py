"""The command line: help text, summary, and the Python entry point."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from gfspy.mkfs.cli import main

from .oracle import MIB, gfspy_mkfs, mkfs_gfs2, sparse_image


@pytest.mark.timeout(30)
def test_help_documents_options_and_exit_codes() -> None:
    proc = gfspy_mkfs("--help")
    assert proc.returncode == 0
    for needle in (
        "-O",
        "-p LOCKPROTO",
        "-t CLUSTER:FSNAME",
        "-j JOURNALS",
        "-J MB",
        "-r MB",
        "-b BYTES",
        "-U UUID",
        "-c MB",
        "-q",
        "DEVICE",
        "BLOCKS",
        "exit status:",
    ):
        assert needle in proc.stdout, needle


@pytest.mark.timeout(60)
def test_summary_matches_mkfs_gfs2_fields(tmp_path: Path) -> None:
    image = sparse_image(tmp_path / "fs.img", 256 * MIB)
    proc = gfspy_mkfs(
        "-p",
        "lock_dlm",
        "-t",
        "c:fs",
        "-j",
        "2",
        "-U",
        "5f38f985-757e-455c-a7de-7e00818287bb",
        str(image),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"Device:                    {image}",
        "Block size:                4096",
        "Device size:               0.25 GB (65536 blocks)",
        "Filesystem size:           0.25 GB (65535 blocks)",
        "Journals:                  2",
        "Journal size:              8MB",
        "Resource groups:           3",
        'Locking protocol:          "lock_dlm"',
        'Lock table:                "c:fs"',
        "UUID:                      5f38f985-757e-455c-a7de-7e00818287bb",
    ]


@pytest.mark.timeout(60)
def test_blocks_argument_limits_the_filesystem_like_mkfs_gfs2(tmp_path: Path) -> None:
    ours = sparse_image(tmp_path / "ours.img", 256 * MIB)
    theirs = sparse_image(tmp_path / "theirs.img", 256 * MIB)
    proc = gfspy_mkfs("-p", "lock_nolock", str(ours), "20000")
    ref = mkfs_gfs2("-O", "-p", "lock_nolock", str(theirs), "20000")
    assert proc.returncode == 0 and ref.returncode == 0, proc.stderr + ref.stderr

    def size_line(text: str) -> str:
        return next(ln for ln in text.splitlines() if ln.startswith("Filesystem size:"))

    assert size_line(proc.stdout) == size_line(ref.stdout)
    assert "(199" in size_line(proc.stdout)  # about 20000 blocks, not the whole 65536


@pytest.mark.timeout(60)
def test_main_returns_status_instead_of_exiting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = sparse_image(tmp_path / "fs.img", 32 * MIB)
    assert main(["-q", "-p", "lock_nolock", str(image)]) == 0
    assert main(["-q", "-p", "lock_nolock", str(image)]) == 1  # now it holds a gfs2
    assert main(["-q", "-b", "1000", str(image)]) == 2
    assert main(["--help"]) == 0
    err = capsys.readouterr().err
    assert "existing gfs2" in err and "power of two" in err


@pytest.mark.timeout(60)
def test_progress_on_a_terminal(tmp_path: Path) -> None:
    """With stderr on a terminal, progress is shown even for a small device; -q hides it."""
    image = sparse_image(tmp_path / "fs.img", 64 * MIB)

    def stderr_on_tty(*args: str) -> str:
        master, slave = pty.openpty()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "gfspy.mkfs", *args, str(image)],
                stdout=subprocess.DEVNULL,
                stderr=slave,
                timeout=60,
            )
            assert proc.returncode == 0
            os.close(slave)
            slave = -1
            out = b""
            while True:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO once the terminal has no writer left
                    break
                if not chunk:
                    break
                out += chunk
            return out.decode()
        finally:
            os.close(master)
            if slave >= 0:
                os.close(slave)

    shown = stderr_on_tty("-O", "-p", "lock_nolock", "-j", "2")
    assert "Writing resource groups: 3/3" in shown
    assert "Writing journals: 2/2" in shown
    assert stderr_on_tty("-O", "-q", "-p", "lock_nolock") == ""
