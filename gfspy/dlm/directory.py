"""Which node is the directory node of a resource name.

The directory node of a name is chosen by hashing the name over the sorted member list,
so every member computes the same answer from the same view with no messages. It only
records who masters the resource (the first node that asked); masters themselves stay
put when membership changes, which keeps lock traffic local to the node that uses it.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence


def name_hash(name: bytes) -> int:
    """A stable 32-bit hash of a resource name (the same on every node and run)."""
    return zlib.crc32(name) & 0xFFFFFFFF


def directory_node(name: bytes, members: Sequence[int]) -> int:
    """The member that keeps the directory entry for `name`; `members` sorted by id."""
    if not members:
        raise ValueError("no members: the lockspace has no view yet")
    return members[(name_hash(name) >> 4) % len(members)]


class Directory:
    """This node's share of the resource directory: name -> master node id."""

    def __init__(self) -> None:
        self.entries: dict[bytes, int] = {}

    def lookup(self, name: bytes, requester: int) -> int:
        """The master of `name`; the first requester becomes master if there is none."""
        master = self.entries.get(name)
        if master is None:
            self.entries[name] = master = requester
        return master

    def clear(self) -> None:
        self.entries.clear()

    def add(self, name: bytes, master: int) -> None:
        self.entries[name] = master

    def __len__(self) -> int:
        return len(self.entries)
