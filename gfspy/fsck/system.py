"""The metadata filesystem: master's required files, jindex and per_node.

The kernel needs jindex's journals numbered 0..N-1 with no gap and a statfs_change and
quota_change per journal; fsck.gfs2 also wants inum and inum_range files and derives
the journal count from per_node, so both views are checked.
"""

from __future__ import annotations

import logging
import re
import stat

from gfspy.fsck.context import Fsck, Inode
from gfspy.fsck.superblock_rgrps import quick_listing
from gfspy.ondisk.constants import (
    DIF_SYSTEM,
    INUM_RANGE_SIZE,
    METATYPE_QC,
    QUOTA_ENTRY_SIZE,
    STATFS_CHANGE_SIZE,
)
from gfspy.ondisk.meta import peek_type, type_name

log = logging.getLogger(__name__)

_MIB = 1 << 20
JOURNAL_MIN = 8 * _MIB
JOURNAL_MAX = 1024 * _MIB
_JOURNAL_NAME = re.compile(rb"journal(\d+)")
#: Files master must hold, with their type and required size rule.
MASTER_FILES = {
    b"jindex": stat.S_IFDIR,
    b"per_node": stat.S_IFDIR,
    b"inum": stat.S_IFREG,
    b"statfs": stat.S_IFREG,
    b"rindex": stat.S_IFREG,
    b"quota": stat.S_IFREG,
}


async def name_system_inodes(fsck: Fsck) -> None:
    """Learn the system files' block numbers early, so messages can name them."""
    system = fsck.system
    system["master"] = fsck.sb.master_dir.addr
    system["root"] = fsck.sb.root_dir.addr
    master = await quick_listing(fsck, await fsck.reader.block(fsck.sb.master_dir.addr))
    for name in MASTER_FILES:
        if name in master and fsck.reader.in_device(master[name]):
            system[name.decode()] = master[name]
    for sub in ("jindex", "per_node"):
        if sub in system:
            listing = await quick_listing(fsck, await fsck.reader.block(system[sub]))
            for name, addr in listing.items():
                if name not in (b".", b"..") and fsck.reader.in_device(addr):
                    system.setdefault(name.decode("utf-8", "backslashreplace"), addr)


def _entries(ino: Inode) -> dict[bytes, int]:
    return {e.name: e.dirent.inum.addr for e in ino.entries if e.name not in (b".", b"..")}


def _need_system(fsck: Fsck, ino: Inode) -> None:
    if not ino.dinode.flags & DIF_SYSTEM:
        fsck.report.problem("system file", ino.label, "lacks the SYSTEM flag")


def _file(fsck: Fsck, parent: Inode, name: bytes, kind: int) -> Inode | None:
    """The inode `name` in `parent`, reported when missing or of the wrong type."""
    addr = _entries(parent).get(name)
    shown = name.decode("utf-8", "backslashreplace")
    if addr is None:
        fsck.report.problem("system file", parent.label, f"has no '{shown}' entry")
        return None
    ino = fsck.inodes.get(addr)
    if ino is None:
        return None  # pass2 already reported the dangling entry
    if stat.S_IFMT(ino.dinode.mode) != kind:
        fsck.report.problem("system file", ino.label, f"has mode 0{ino.dinode.mode:o}, wrong type")
        return None
    _need_system(fsck, ino)
    return ino


def check_system(fsck: Fsck) -> list[tuple[int, Inode]]:
    """Check the system files; return the journals as (number, inode) in order."""
    master = fsck.inodes.get(fsck.sb.master_dir.addr)
    if master is None or not master.dinode.is_dir():
        return []
    _need_system(fsck, master)
    files = {name: _file(fsck, master, name, kind) for name, kind in MASTER_FILES.items()}
    bs = fsck.geo.bsize
    sizes = {b"statfs": STATFS_CHANGE_SIZE, b"inum": 8}
    for name, size in sizes.items():
        ino = files[name]
        if ino is not None and ino.dinode.size != size:
            fsck.report.problem(
                "system file", ino.label, f"size is {ino.dinode.size}, expected {size}"
            )
    quota = files[b"quota"]
    if quota is not None and quota.dinode.size % QUOTA_ENTRY_SIZE:
        fsck.report.problem(
            "system file",
            quota.label,
            f"size {quota.dinode.size} is not a multiple of {QUOTA_ENTRY_SIZE}",
        )
    journals: list[tuple[int, Inode]] = []
    named = 0
    jindex = files[b"jindex"]
    if jindex is not None:
        named, journals = _check_jindex(fsck, jindex, bs)
    per_node = files[b"per_node"]
    if per_node is not None and jindex is not None:
        _check_per_node(fsck, per_node, named)
    return journals


def _check_jindex(fsck: Fsck, jindex: Inode, bs: int) -> tuple[int, list[tuple[int, Inode]]]:
    """Journal names and files; returns (journals named, usable journals in order)."""
    report = fsck.report
    numbered: dict[int, int] = {}
    for name, addr in _entries(jindex).items():
        m = _JOURNAL_NAME.fullmatch(name)
        if m is None or (len(m.group(1)) > 1 and m.group(1).startswith(b"0")):
            shown = name.decode("utf-8", "backslashreplace")
            report.problem("jindex", jindex.label, f"entry {shown!r} is not named journal<N>")
            continue
        numbered[int(m.group(1))] = addr
    if not numbered:
        report.problem("jindex", jindex.label, "holds no journals")
        return 0, []
    count = len(numbered)
    missing = [j for j in range(count) if j not in numbered]
    if missing:
        report.problem(
            "jindex", jindex.label, f"journal numbers are not 0..{count - 1}: missing {missing}"
        )
    journals = []
    for j, addr in sorted(numbered.items()):
        ino = fsck.inodes.get(addr)
        if ino is None:
            continue
        if not ino.dinode.is_reg():
            report.problem("journal", ino.label, "journal is not a regular file")
            continue
        _need_system(fsck, ino)
        size = ino.dinode.size
        if size % bs or not JOURNAL_MIN <= size <= JOURNAL_MAX:
            report.problem(
                "journal",
                ino.label,
                f"journal size {size} is not a whole number of blocks between 8 MiB and 1 GiB",
            )
            continue
        if ino.data_blocks != size // bs:
            report.problem(
                "journal",
                ino.label,
                f"journal has {ino.data_blocks} blocks allocated, its size needs {size // bs}",
            )
            continue
        journals.append((j, ino))
    return count, journals


def _check_per_node(fsck: Fsck, per_node: Inode, journals: int) -> None:
    report = fsck.report
    entries = _entries(per_node)
    if len(entries) != 3 * journals:
        report.problem(
            "per_node",
            per_node.label,
            f"holds {len(entries)} files; {journals} journal(s) need {3 * journals}",
        )
    for j in range(journals):
        for prefix, rule in (
            (b"inum_range", lambda s: s == INUM_RANGE_SIZE),
            (b"statfs_change", lambda s: s == STATFS_CHANGE_SIZE),
            (b"quota_change", lambda s: s > 0 and s % _MIB == 0),
        ):
            name = prefix + str(j).encode()
            ino = _file(fsck, per_node, name, stat.S_IFREG)
            if ino is None:
                continue
            if not rule(ino.dinode.size):
                report.problem(
                    "per_node", ino.label, f"size {ino.dinode.size} is wrong for {name.decode()}"
                )
            if prefix == b"quota_change":
                fsck.quota_change.append(ino)
                if ino.data_blocks * fsck.geo.bsize < ino.dinode.size:
                    report.problem(
                        "per_node",
                        ino.label,
                        f"only {ino.data_blocks} blocks allocated for size {ino.dinode.size}",
                    )


async def check_quota_change_blocks(fsck: Fsck) -> None:
    """Every quota_change data block must carry a QC header (the kernel checks it)."""
    for ino in fsck.quota_change:
        blocks = [b for s, n in ino.data_runs for b in range(s, s + n)]
        got = await fsck.reader.blocks(blocks)
        bad = [b for b in blocks if peek_type(got.get(b, b"")) != METATYPE_QC]
        if bad:
            t = peek_type(got.get(bad[0], b""))
            found = "no metadata header" if t is None else type_name(t)
            fsck.report.problem(
                "per_node",
                ino.label,
                f"{len(bad)} quota_change block(s) lack a QC header, first {bad[0]} ({found})",
            )
