"""Fixtures for the checker's tests: real images from mkfs.gfs2 and runners for
gfspy-fsck (as a subprocess, the way users run it) and for fsck.gfs2 (the oracle).
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from gfspy.fsck.cli import main

from .corrupt import Image
from .populate import Populated, populate

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Spec:
    """One mkfs.gfs2 configuration."""

    bsize: int = 4096
    journals: int = 2
    size: str = "256M"
    lockproto: str = "lock_dlm"
    journal_mib: int | None = None

    @property
    def id(self) -> str:
        return f"b{self.bsize}-j{self.journals}-{self.size}-{self.lockproto}"


def mkfs(path: Path, spec: Spec) -> Path:
    """Make a sparse image file and format it with Debian's mkfs.gfs2."""
    path.unlink(missing_ok=True)
    subprocess.run(["truncate", "-s", spec.size, str(path)], check=True)
    cmd = ["mkfs.gfs2", "-O", "-b", str(spec.bsize), "-j", str(spec.journals), "-p", spec.lockproto]
    if spec.lockproto == "lock_dlm":
        cmd += ["-t", "testclu:fsck"]
    if spec.journal_mib:
        cmd += ["-J", str(spec.journal_mib)]
    subprocess.run([*cmd, str(path)], check=True, capture_output=True, timeout=120)
    return path


def run_fsck(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """gfspy-fsck as a user runs it: a separate process, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "gfspy.fsck", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def run_fsck_here(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """gfspy-fsck's main() in this process, output captured: the same code as the
    command without an interpreter start per call, for the many fault tests."""
    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return subprocess.CompletedProcess(argv, status, out.getvalue(), err.getvalue())


def run_fsck_gfs2(path: Path) -> subprocess.CompletedProcess[str]:
    """The oracle: Debian's fsck.gfs2 in no-change mode."""
    return subprocess.run(
        ["fsck.gfs2", "-n", str(path)], capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="session")
def pristine_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh 256 MiB, 4 KiB-block, two-journal lock_dlm image, made once.

    Tests never touch it; they copy it (see `fresh_image`).
    """
    return mkfs(tmp_path_factory.mktemp("pristine") / "gfs2.img", Spec())


@pytest.fixture
def fresh_image(pristine_image: Path, tmp_path: Path) -> Path:
    """A private copy of the pristine image for one test to corrupt."""
    path = tmp_path / "gfs2.img"
    subprocess.run(["cp", "--sparse=always", str(pristine_image), str(path)], check=True)
    return path


@pytest.fixture(scope="session")
def populated_pristine(
    pristine_image: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Populated]:
    """The pristine image plus files, exhash directories and xattrs (populate.py)."""
    path = tmp_path_factory.mktemp("populated") / "gfs2.img"
    subprocess.run(["cp", "--sparse=always", str(pristine_image), str(path)], check=True)
    return path, populate(Image(path))


@pytest.fixture
def populated_image(
    populated_pristine: tuple[Path, Populated], tmp_path: Path
) -> tuple[Path, Populated]:
    """A private copy of the populated image for one test to corrupt."""
    source, layout = populated_pristine
    path = tmp_path / "gfs2.img"
    subprocess.run(["cp", "--sparse=always", str(source), str(path)], check=True)
    return path, layout
