"""One transaction: the set of block images and revokes that must reach the disk
atomically.

A transaction is just a collection; it does no I/O. `Journal.commit` lays it out in the
log and writes it. Keeping it passive lets the filesystem layer build one while it
holds its glocks and hand it over in a single call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gfspy.ondisk.constants import METATYPE_LB, METATYPE_LD, METATYPE_LH, METATYPE_NAMES
from gfspy.ondisk.meta import peek_type

# Log-structure block types must never be logged as metadata: a logged copy of a log
# header would be taken for a real header when the journal is scanned for its head.
_FORBIDDEN_TYPES = (METATYPE_LH, METATYPE_LD, METATYPE_LB)


class TransactionError(ValueError):
    """A block handed to a transaction cannot be journaled as asked."""


@dataclass
class Transaction:
    """Blocks to log in one commit, keyed by in-place block number.

    The last word about a block wins: logging it again replaces the image, logging it
    as data after metadata (or the reverse) moves it, and revoking it drops any image
    held here. Logging a block cancels a revoke of it made earlier in this same
    transaction, because in the log the revoke would follow the new copy and hide it.
    """

    bsize: int
    metadata: dict[int, bytes] = field(default_factory=dict)
    jdata: dict[int, bytes] = field(default_factory=dict)
    revokes: set[int] = field(default_factory=set)
    #: Change to this node's statfs (total, free, dinodes) made by this transaction.
    statfs_delta: list[int] = field(default_factory=lambda: [0, 0, 0])

    def _check_image(self, blkno: int, image: bytes | bytearray | memoryview) -> bytes:
        if blkno <= 0:
            raise TransactionError(f"block number {blkno} cannot be journaled")
        if len(image) != self.bsize:
            raise TransactionError(
                f"block {blkno}: image is {len(image)} bytes, block size is {self.bsize}"
            )
        return bytes(image)

    def add_metadata(self, blkno: int, image: bytes | bytearray | memoryview) -> None:
        """Log the full new image of metadata block `blkno`.

        The image must start with the GFS2 magic: replay refuses metadata copies
        without it, so a block that is not metadata must go through `add_jdata`.
        """
        data = self._check_image(blkno, image)
        mh_type = peek_type(data)
        if mh_type is None:
            raise TransactionError(f"block {blkno}: metadata image lacks the GFS2 magic")
        if mh_type in _FORBIDDEN_TYPES:
            name = METATYPE_NAMES[mh_type]
            raise TransactionError(f"block {blkno}: a {name} block cannot be logged")
        self.jdata.pop(blkno, None)
        self.revokes.discard(blkno)
        self.metadata[blkno] = data

    def add_jdata(self, blkno: int, data: bytes | bytearray | memoryview) -> None:
        """Log the full new contents of journaled-data block `blkno` (escaped when
        written to the log if it happens to start with the magic)."""
        image = self._check_image(blkno, data)
        self.metadata.pop(blkno, None)
        self.revokes.discard(blkno)
        self.jdata[blkno] = image

    def revoke(self, blkno: int) -> None:
        """Say that `blkno` was freed or now holds unjournaled data: copies of it
        logged before this transaction must not be replayed."""
        if blkno <= 0:
            raise TransactionError(f"block number {blkno} cannot be revoked")
        self.metadata.pop(blkno, None)
        self.jdata.pop(blkno, None)
        self.revokes.add(blkno)

    def change_statfs(self, total: int = 0, free: int = 0, dinodes: int = 0) -> None:
        """Record this transaction's effect on the node's statfs counters; the log
        header carries the running sum (lh_local_*) so recovery can fold it in."""
        self.statfs_delta[0] += total
        self.statfs_delta[1] += free
        self.statfs_delta[2] += dinodes

    def merge(self, later: Transaction) -> None:
        """Fold a later transaction into this one, as if its changes had been made
        here afterwards (group commit: many small transactions, one log write)."""
        if later.bsize != self.bsize:
            raise TransactionError(f"block size {later.bsize} != {self.bsize}")
        for blkno in later.revokes:
            self.revoke(blkno)
        for blkno, image in later.jdata.items():
            self.add_jdata(blkno, image)
        for blkno, image in later.metadata.items():
            self.add_metadata(blkno, image)
        self.change_statfs(*later.statfs_delta)

    @property
    def blocks(self) -> set[int]:
        """Every in-place block this transaction writes."""
        return set(self.metadata) | set(self.jdata)

    def __bool__(self) -> bool:
        return bool(self.metadata or self.jdata or self.revokes or any(self.statfs_delta))
