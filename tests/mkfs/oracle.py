"""Run the real tools (gfspy-mkfs, mkfs.gfs2, fsck.gfs2, gfs2_edit) and read their answers.

Both images of a comparison are inspected with gfs2_edit, a tool neither side wrote, so
a bug in a gfspy reader cannot hide a bug in gfspy-mkfs.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20

#: Lines fsck.gfs2 -n prints on a clean filesystem; anything else is a complaint.
_FSCK_PROGRESS = re.compile(
    r"^(Initializing fsck|Validating resource group index\.|"
    r"Level \d resource group check: .*|\(level \d passed\)|Starting pass\w+|"
    r"pass\w+ completed in [\d.]+s|Reconciling bitmaps\.|reconcile_bitmaps completed in [\d.]+s|"
    r"Starting check_statfs|check_statfs completed in [\d.]+s|fsck\.gfs2 complete|"
    r"\d+ percent complete\.)$"
)
_DIRENT = re.compile(
    r"\[[0-9A-F]{8}\] (\d+)/(\d+) \(0x[0-9a-f]+/0x[0-9a-f]+\) \+\d+: (\w+)\s+(\S+)\s*$"
)
_RINDEX_FIELD = re.compile(r"^\s+ri_(addr|length|data0|data|bitbytes)\s+(\d+)", re.M)


def sparse_image(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def gfspy_mkfs(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the real command-line tool in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "gfspy.mkfs", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def mkfs_gfs2(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["mkfs.gfs2", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def fsck_complaints(image: Path, timeout: float = 120) -> tuple[int, list[str]]:
    """(exit status, lines of `fsck.gfs2 -n` output that are not clean-run progress)."""
    proc = subprocess.run(
        ["fsck.gfs2", "-n", str(image)], capture_output=True, text=True, timeout=timeout
    )
    lines = (proc.stdout + proc.stderr).splitlines()
    return proc.returncode, [ln for ln in lines if ln.strip() and not _FSCK_PROGRESS.match(ln)]


def _edit(image: Path, what: str) -> str:
    # gfs2_edit needs a path containing '/'.
    proc = subprocess.run(
        ["gfs2_edit", "-p", what, str(image.resolve())],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return proc.stdout


@dataclass(frozen=True)
class Entry:
    formal: int
    addr: int
    kind: str
    name: str


def dir_entries(image: Path, what: str) -> dict[str, Entry]:
    """Entries of a system directory ('master', 'jindex', 'per_node') by name."""
    out = {}
    for line in _edit(image, what).splitlines():
        m = _DIRENT.search(line)
        if m:
            formal, addr, kind, name = m.groups()
            out[name] = Entry(int(formal), int(addr), kind, name)
    return out


def rindex(image: Path) -> list[tuple[int, int, int, int, int]]:
    """(ri_addr, ri_length, ri_data0, ri_data, ri_bitbytes) of every rgrp, pad ignored."""
    fields = _RINDEX_FIELD.findall(_edit(image, "rindex"))
    entries, current = [], {}
    for key, value in fields:
        current[key] = int(value)
        if key == "bitbytes":
            entries.append(
                tuple(current[k] for k in ("addr", "length", "data0", "data", "bitbytes"))
            )
            current = {}
    return entries


def superblock_dirs(image: Path) -> dict[str, Entry]:
    """The superblock's 'root' and 'master' inums."""
    return dir_entries(image, "sb")


def system_inode_map(image: Path) -> dict[str, int]:
    """Block address of every system dinode, keyed by path ('master', 'jindex/journal0')."""
    addrs = {name: e.addr for name, e in superblock_dirs(image).items()}
    for name, e in dir_entries(image, "master").items():
        if name not in (".", ".."):
            addrs[name] = e.addr
    for sub in ("jindex", "per_node"):
        for name, e in dir_entries(image, sub).items():
            if name not in (".", ".."):
                addrs[f"{sub}/{name}"] = e.addr
    return addrs


def tunegfs2_list(image: Path) -> dict[str, str]:
    proc = subprocess.run(
        ["tunegfs2", "-l", str(image)], capture_output=True, text=True, timeout=60, check=True
    )
    out = {}
    for line in proc.stdout.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out
