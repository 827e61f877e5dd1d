"""Pass 4: link counts and orphans.

Counting every entry that names an inode (including '.' and every child's '..') gives
exactly what nlink must be for both files (one per name) and directories (2 plus one
per child directory), so one rule covers every inode, root and master included.
"""

from __future__ import annotations

import logging

from gfspy.fsck.context import Fsck

log = logging.getLogger(__name__)


def pass4(fsck: Fsck, refs: dict[int, int]) -> None:
    report = fsck.report
    for addr, ino in sorted(fsck.inodes.items()):
        found = refs.get(addr, 0)
        if found == 0:
            report.problem(
                "orphan",
                ino.label,
                f"is not named by any directory entry (nlink {ino.dinode.nlink}, "
                f"size {ino.dinode.size})",
            )
            continue
        if ino.dinode.nlink != found:
            names = "1 directory entry names" if found == 1 else f"{found} directory entries name"
            report.problem("nlink", ino.label, f"link count is {ino.dinode.nlink} but {names} it")
