"""The state one check run shares between its passes.

Each pass reads what the earlier ones established (the rgrps and their bitmaps, the
dinodes, the directory entries) and adds its own findings; keeping them in one place
keeps the passes free of each other's internals.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from gfspy.fsck.blockmap import BlockMap
from gfspy.fsck.reader import BlockReader
from gfspy.fsck.report import Report
from gfspy.ondisk.constants import Geometry
from gfspy.ondisk.dinode import Dinode
from gfspy.ondisk.directory import Dirent
from gfspy.ondisk.rgrp import RgrpHeader, RindexEntry
from gfspy.ondisk.superblock import Superblock

log = logging.getLogger(__name__)


@dataclass
class Rgrp:
    """One resource group as found on disk."""

    index: int
    entry: RindexEntry
    header: RgrpHeader | None
    #: The concatenated bitmap (ri_bitbytes bytes); empty when the header was unreadable.
    bitmap: bytes
    #: (free, used, unlinked, dinode) counts of the bitmap.
    counts: tuple[int, int, int, int] = (0, 0, 0, 0)


@dataclass
class DirEntry:
    """A live directory entry, remembered for the link and reachability passes."""

    dir_addr: int
    name: bytes
    dirent: Dirent
    where: str


@dataclass
class Inode:
    """A dinode that decoded, with what pass1 learnt about it."""

    addr: int
    dinode: Dinode
    #: The dinode block itself (directories need their stuffed payload later).
    block: bytes
    #: Data blocks in logical order as (first block, count) runs; holes are skipped.
    data_runs: list[tuple[int, int]] = field(default_factory=list)
    #: Logical blocks the runs cover (to detect holes in files that must have none).
    data_blocks: int = 0
    #: Directories: the live entries, gathered in pass1 from the dinode or the leaves.
    entries: list[DirEntry] = field(default_factory=list)
    #: A name a message can use ("inode 4656 (root)").
    label: str = ""

    def __post_init__(self) -> None:
        if not self.label:
            self.label = f"inode {self.addr}"


@dataclass
class Fsck:
    """Everything the passes share."""

    reader: BlockReader
    report: Report
    sb: Superblock
    geo: Geometry
    rgrps: list[Rgrp] = field(default_factory=list)
    blockmap: BlockMap = field(default_factory=BlockMap)
    inodes: dict[int, Inode] = field(default_factory=dict)
    #: Blocks the bitmaps mark DINODE (or UNLINKED) that did not decode as dinodes.
    bad_dinodes: set[int] = field(default_factory=set)
    #: Named system inodes: "master", "root", "jindex", "journal0", "statfs_change1"...
    system: dict[str, int] = field(default_factory=dict)
    #: The quota_change files found in per_node (their blocks are checked later).
    quota_change: list[Inode] = field(default_factory=list)

    @property
    def fs_blocks(self) -> int:
        """Blocks the filesystem spans: the end of the last rgrp's data."""
        return max((r.entry.end for r in self.rgrps), default=0)

    def rgrp_of(self, block: int) -> Rgrp | None:
        """The rgrp whose data area holds `block` (binary search over data0)."""
        lo, hi = 0, len(self.rgrps)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.rgrps[mid].entry.data0 <= block:
                lo = mid + 1
            else:
                hi = mid
        if lo == 0:
            return None
        rg = self.rgrps[lo - 1]
        return rg if rg.entry.contains(block) else None

    def label(self, addr: int) -> str:
        ino = self.inodes.get(addr)
        return ino.label if ino else f"inode {addr}"
