"""The in-core inode: the decoded dinode plus what the mount tracks about it."""

from __future__ import annotations

from dataclasses import dataclass

from gfspy.ondisk.dinode import Dinode


@dataclass(eq=False)
class Inode:
    """One cached inode. `di` is authoritative; it is packed into the dinode block
    whenever a transaction that changed it ends."""

    addr: int
    di: Dinode
    #: Opens by the FUSE layer; an unlinked inode is freed when this drops to 0.
    open_count: int = 0
    #: True once nlink reached 0 while open: the bitmap says UNLINKED.
    unlinked: bool = False
    #: Exhash directories: the hash table (leaf block per slot), loaded on demand.
    hash_table: list[int] | None = None
    #: Deallocated: its block is free and it must never be written again.
    freed: bool = False

    @property
    def ino(self) -> int:
        return self.addr
