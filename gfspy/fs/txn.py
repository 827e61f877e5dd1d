"""FsTxn: what one filesystem operation changed, gathered before it goes to the journal.

Operations edit cached block images in place and name them here; at the end the
images are copied into one journal Transaction. Keeping this separate from the
journal's own Transaction lets the allocator and the inode code record rgrp and
statfs effects without knowing how the log lays them out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gfspy.fs.alloc import Rgrp


@dataclass(eq=False)
class FsTxn:
    #: Metadata blocks whose cached image changed.
    dirty: set[int] = field(default_factory=set)
    #: Inodes whose dinode struct must be packed back into its block.
    inodes: set[Any] = field(default_factory=set)
    #: Rgrps whose header/bitmap images must be rebuilt.
    rgrps: set[Rgrp] = field(default_factory=set)
    #: Blocks freed: not logged even if dirty, and revoked so that no older logged
    #: copy of them is replayed over whatever they hold next.
    freed: set[int] = field(default_factory=set)
    #: Freed metadata blocks: logged copies of them must not be replayed.
    revoke: set[int] = field(default_factory=set)
    statfs_total: int = 0
    statfs_free: int = 0
    statfs_dinodes: int = 0
    #: Glock holders taken by the operation, released when it ends.
    holders: list[Any] = field(default_factory=list)
    held: dict[tuple[int, int], Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.dirty or self.inodes or self.rgrps or self.freed)
