"""Passes 2 and 3: every directory entry against its target, '.' and '..', entry
counts, and reachability of every directory from root or master.

Pass 2 also counts the references to each inode, which pass 4 compares with nlink.
"""

from __future__ import annotations

import logging
from collections import deque

from gfspy.fsck.context import Fsck, Inode
from gfspy.ondisk.checksums import name_hash
from gfspy.ondisk.constants import NAME_MAX, dt_from_mode

log = logging.getLogger(__name__)


def pass2(fsck: Fsck) -> dict[int, int]:
    """Check every entry; return references per target inode (for pass 4)."""
    refs: dict[int, int] = {}
    for ino in list(fsck.inodes.values()):
        if ino.dinode.is_dir():
            _check_dir(fsck, ino, refs)
    return refs


def _check_dir(fsck: Fsck, ino: Inode, refs: dict[int, int]) -> None:
    report = fsck.report
    dots = dotdots = 0
    for e in ino.entries:
        d = e.dirent
        where = f"{ino.label} {e.where}"
        shown = e.name.decode("utf-8", "backslashreplace")
        if not 1 <= d.name_len <= NAME_MAX:
            report.problem("dirent", where, f"entry {shown!r} has name length {d.name_len}")
        want_hash = name_hash(e.name)
        if d.hash != want_hash:
            report.problem(
                "dirent hash",
                where,
                f"entry {shown!r} has hash 0x{d.hash:08x}, expected 0x{want_hash:08x}",
            )
        target_addr = d.inum.addr
        target = fsck.inodes.get(target_addr)
        if e.name == b".":
            dots += 1
            if target_addr != ino.addr:
                report.problem("dirent", where, f"'.' points to block {target_addr}, not itself")
        elif e.name == b"..":
            dotdots += 1
        if target is None:
            why = (
                "which is not a valid dinode"
                if target_addr in fsck.bad_dinodes
                else "which is not marked as a dinode in the bitmap"
            )
            report.problem("dirent", where, f"entry {shown!r} points to block {target_addr} {why}")
            continue
        refs[target_addr] = refs.get(target_addr, 0) + 1
        if d.inum.formal != target.dinode.formal:
            report.problem(
                "dirent",
                where,
                f"entry {shown!r} has formal inode number {d.inum.formal}, but inode "
                f"{target_addr} has {target.dinode.formal}",
            )
        want_type = dt_from_mode(target.dinode.mode)
        if d.type != want_type:
            report.problem(
                "dirent",
                where,
                f"entry {shown!r} has type {d.type} but inode {target_addr} has type {want_type}",
            )
        if e.name == b".." and not target.dinode.is_dir():
            report.problem("dirent", where, f"'..' points to inode {target_addr}, not a directory")
    if dots != 1:
        report.problem("directory", ino.label, f"has {dots} '.' entries, expected 1")
    if dotdots != 1:
        report.problem("directory", ino.label, f"has {dotdots} '..' entries, expected 1")
    live = len(ino.entries)
    if ino.dinode.entries != live:
        report.problem(
            "di_entries", ino.label, f"di_entries is {ino.dinode.entries} but found {live} entries"
        )


def pass3(fsck: Fsck) -> None:
    """Every directory reachable from root or master, once, with a consistent '..'."""
    report = fsck.report
    roots = [a for a in (fsck.sb.root_dir.addr, fsck.sb.master_dir.addr) if a in fsck.inodes]
    for name, inum in (("root", fsck.sb.root_dir), ("master", fsck.sb.master_dir)):
        ino = fsck.inodes.get(inum.addr)
        if ino is None:
            report.problem(
                "directory", f"{name} directory (block {inum.addr})", "is not a valid dinode"
            )
        elif not ino.dinode.is_dir():
            report.problem("directory", ino.label, f"the superblock's {name} is not a directory")
        elif ino.dinode.formal != inum.formal:
            report.problem(
                "directory",
                ino.label,
                f"formal number {ino.dinode.formal} differs from the superblock's {inum.formal}",
            )
    parent: dict[int, int] = {a: a for a in roots}
    queue = deque(roots)
    while queue:
        addr = queue.popleft()
        ino = fsck.inodes[addr]
        if not ino.dinode.is_dir():
            continue
        for e in ino.entries:
            if e.name in (b".", b".."):
                continue
            child = fsck.inodes.get(e.dirent.inum.addr)
            if child is None or not child.dinode.is_dir():
                continue
            if child.addr in parent:
                report.problem(
                    "directory",
                    child.label,
                    f"directory is linked from both inode {parent[child.addr]} and inode {addr}",
                )
                continue
            parent[child.addr] = addr
            queue.append(child.addr)
    for addr, ino in fsck.inodes.items():
        if not ino.dinode.is_dir():
            continue
        if addr not in parent:
            report.problem(
                "unreachable", ino.label, "directory is not reachable from root or master"
            )
            continue
        dotdot = [e.dirent.inum.addr for e in ino.entries if e.name == b".."]
        if dotdot and dotdot[0] != parent[addr]:
            report.problem(
                "directory",
                ino.label,
                f"'..' points to inode {dotdot[0]} but the directory is linked from "
                f"inode {parent[addr]}",
            )
