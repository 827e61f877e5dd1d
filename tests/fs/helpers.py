"""Shared helpers for the fs tests: real images from gfspy-mkfs and mkfs.gfs2, and
the two checkers (fsck.gfs2, the oracle, and gfspy-fsck) run as the user runs them."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from gfspy.blockdev.local import LocalDevice
from gfspy.fs.api import FileSystem

REPO = Path(__file__).resolve().parents[2]

# fsck.gfs2 prints these on a healthy image; anything else is a complaint.
_FSCK_PROGRESS = re.compile(
    r"^(Initializing fsck|Validating resource group index\.|Level 1 resource group check"
    r".*|\(level 1 passed\)|Starting (pass\S+|check_statfs)|Reconciling bitmaps\.|"
    r"\S+ completed in [0-9.]+s|fsck\.gfs2 complete|\d+ percent complete\.)$"
)


def make_image(
    path: Path,
    *,
    tool: str = "gfspy",
    size_mib: int = 128,
    bsize: int = 4096,
    lockproto: str = "lock_nolock",
    extra: tuple[str, ...] = (),
) -> Path:
    """A fresh filesystem image made by gfspy's mkfs or by the real mkfs.gfs2."""
    with open(path, "wb") as f:
        f.truncate(size_mib << 20)
    if tool == "gfspy":
        cmd = [sys.executable, "-m", "gfspy.mkfs", "-O", "-p", lockproto, "-b", str(bsize)]
    else:
        cmd = ["mkfs.gfs2", "-O", "-p", lockproto, "-b", str(bsize)]
    if lockproto == "lock_dlm":
        cmd += ["-t", "testc:testfs"]
    subprocess.run(
        [*cmd, *extra, str(path)], check=True, capture_output=True, timeout=120, cwd=REPO
    )
    return path


def fsck_gfs2(path: Path, mode: str = "-n") -> tuple[int, list[str]]:
    """Run fsck.gfs2; return its exit status and every line that is not progress."""
    proc = subprocess.run(
        ["fsck.gfs2", mode, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=240,
    )
    complaints = [
        line for line in proc.stdout.splitlines() if line.strip() and not _FSCK_PROGRESS.match(line)
    ]
    return proc.returncode, complaints


def gfspy_fsck(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gfspy.fsck", "-n", str(path)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
    )


def assert_clean(path: Path) -> None:
    """Both checkers accept the image without a word of complaint."""
    rc, complaints = fsck_gfs2(path, "-n")
    assert rc == 0 and not complaints, "\n".join(complaints)
    ours = gfspy_fsck(path)
    assert ours.returncode == 0, ours.stdout + ours.stderr


@asynccontextmanager
async def mounted(path: Path, **kwargs) -> AsyncIterator[FileSystem]:
    """A FileSystem on an image file, closed cleanly (and the device too) at the end."""
    device = await LocalDevice.open(str(path))
    try:
        fs = await FileSystem.open(device, **kwargs)
        try:
            yield fs
        finally:
            await fs.close()
    finally:
        await device.aclose()


async def write_file(fs: FileSystem, parent: int, name: bytes, data: bytes) -> int:
    attr = await fs.create(parent, name, 0o100644, 0, 0)
    written = await fs.write(attr.ino, 0, data)
    assert written == len(data)
    return attr.ino


async def read_all(fs: FileSystem, ino: int) -> bytes:
    attr = await fs.getattr(ino)
    return await fs.read(ino, 0, attr.size)


async def list_dir(fs: FileSystem, ino: int) -> list[bytes]:
    names: list[bytes] = []
    cookie = 0
    while True:
        batch = await fs.readdir(ino, cookie)
        if not batch:
            return names
        names.extend(name for name, _attr, _next in batch)
        cookie = batch[-1][2]
