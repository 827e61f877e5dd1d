"""The log writer for one journal, with its active items list (AIL).

Life of a block: `commit` (or `add`, then `flush`, so that many operations share one
log write) writes its copy to the log, flushes, writes ONE log header and flushes
again; only then is the block "in the AIL" and may be written in place (`write_back`,
`checkpoint`, the log daemon, or a commit when the AIL grows past its memory bound,
which writes the oldest transactions back). Once written in place and flushed it
leaves the AIL, and the tail (the oldest transaction with blocks still only in the
log) moves forward; the next header records that tail, and log space behind it can be
reused. Replay of a crash therefore always finds, between tail and head, every
transaction whose in-place writes might be incomplete.

Positions are kept as ever-increasing "log positions"; the journal block is the
position modulo the journal length, which keeps wrap-around arithmetic out of the
ordering logic.

Contract with callers (the filesystem and glock layers):
* never write a journaled block in place yourself; let the journal do it;
* a block freed in transaction T (via `Transaction.revoke`) may be reused for
  unjournaled data only after the commit (or flush) that wrote T returned;
* on glock demotion call `sync_blocks` for the lock's blocks: it writes them back and
  revokes their copies still in the live part of the log, so that replaying this
  journal later can never overwrite what another node writes next.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import trio

from gfspy.blockdev.device import Device
from gfspy.journal.extent import (
    JournalExtents,
    JournalLayoutError,
    map_journal,
    read_log_blocks,
    write_home_blocks,
    write_log_blocks,
)
from gfspy.journal.layout import LogBody, build_log_body, build_log_header, log_blocks_needed
from gfspy.journal.locate import locate_journal
from gfspy.journal.replay import recover_journal
from gfspy.journal.scan import scan_journal
from gfspy.journal.transaction import Transaction
from gfspy.ondisk.constants import LFC_SHUTDOWN, LH_FLUSH_NORMAL, LH_UNMOUNT
from gfspy.ondisk.journal import LogHeader

log = logging.getLogger(__name__)

OrderedHook = Callable[[], Awaitable[None]]


class JournalError(RuntimeError):
    """Base of the journal writer's errors."""


class JournalDirtyError(JournalError):
    """The journal holds transactions that were never replayed; replay it first."""


class JournalFullError(JournalError):
    """A transaction is too large to fit in the journal even when it is empty."""


class JournalWithdrawnError(JournalError):
    """An earlier I/O failure left the journal in an unknown state; no more writes."""


@dataclass(slots=True)
class _AilItem:
    """A block committed to the log but not yet written in place."""

    image: bytes
    txn_start: int


class Journal:
    """One journal (jid) over a Device: commits, write-back, checkpoints, unmount."""

    def __init__(
        self,
        device: Device,
        extents: JournalExtents,
        *,
        jid: int,
        next_sequence: int,
        head_position: int,
        statfs_addr: int = 0,
        quota_addr: int = 0,
        statfs_local: tuple[int, int, int] = (0, 0, 0),
        max_ail_blocks: int = 16384,
    ) -> None:
        """Prefer `Journal.open`; this constructor trusts `head_position` to be the
        log position of the newest header, which must be a clean (UNMOUNT) one."""
        self.device = device
        self.extents = extents
        self.bsize = extents.bsize
        self.jid = jid
        self.statfs_addr = statfs_addr
        self.quota_addr = quota_addr
        #: Running statfs change not yet folded into the master statfs (lh_local_*).
        self.statfs_local = list(statfs_local)
        #: Most committed-but-not-written-back blocks kept in memory (64 MiB at 4 KiB);
        #: past it a commit writes the oldest transactions back in place.
        self.max_ail_blocks = max_ail_blocks
        self._size = extents.blocks
        self._next_sequence = next_sequence
        self._last_header = head_position
        self._head = head_position + 1  # where the next log block goes
        self._disk_tail = head_position  # tail recorded by the newest header
        self._ail: dict[int, _AilItem] = {}
        # txn start -> its blocks still in the AIL; keys ascend, so the first is the tail
        self._txn_blocks: dict[int, set[int]] = {}
        self._logged_at: dict[int, int] = {}  # block -> position of its newest copy
        self._lock = trio.Lock()
        self._running = Transaction(self.bsize)  # merged by add(), written by flush()
        self._running_hooks: list[OrderedHook] = []
        self._failed: BaseException | None = None
        self._closed = False
        #: Counters for tests and the admin tool.
        self.commits = 0
        self.checkpoints = 0
        self.forced_checkpoints = 0
        self.name = f"journal{jid} ({device.name})"

    @classmethod
    async def open(
        cls,
        device: Device,
        bsize: int,
        dinode_addr: int,
        *,
        jid: int,
        statfs_addr: int = 0,
        quota_addr: int = 0,
    ) -> Journal:
        """Map the journal through its dinode, find its head and get ready to append.

        Refuses a dirty journal (JournalDirtyError): appending after unreplayed
        transactions would lose them. Refuses a journal with no valid header or with
        repeated sequence numbers (JournalLayoutError): its head is ambiguous.
        """
        extents = await map_journal(device, bsize, dinode_addr)
        scan = await scan_journal(device, list(extents.runs), bsize)
        name = f"journal{jid} ({device.name})"
        if scan.head is None:
            raise JournalLayoutError(f"{name}: no valid log header")
        if scan.duplicate_sequences:
            seq = min(scan.duplicate_sequences)
            raise JournalLayoutError(f"{name}: sequence {seq} appears more than once")
        if not scan.clean:
            raise JournalDirtyError(
                f"{name}: dirty (head at block {scan.head.position}, sequence "
                f"{scan.head.sequence}); replay it before writing"
            )
        # Statfs deltas not yet folded into the master survive a clean unmount in the
        # head header; carry them on so every later header still holds the full sum.
        (head_block,) = await read_log_blocks(device, extents, scan.head.position, 1)
        head = LogHeader.unpack(head_block)
        log.info(
            "%s: opened, head at block %d, sequence %d",
            name,
            scan.head.position,
            scan.head.sequence,
        )
        return cls(
            device,
            extents,
            jid=jid,
            next_sequence=scan.head.sequence + 1,
            head_position=scan.head.position,
            statfs_addr=statfs_addr,
            quota_addr=quota_addr,
            statfs_local=(head.local_total, head.local_free, head.local_dinodes),
        )

    # ----------------------------------------------------------------- queries

    @property
    def journal_blocks(self) -> int:
        return self._size

    @property
    def next_sequence(self) -> int:
        return self._next_sequence

    @property
    def head_block(self) -> int:
        """Journal block where the next log block will be written."""
        return self._head % self._size

    @property
    def ail_blocks(self) -> set[int]:
        """In-place blocks whose newest image exists only in the log so far."""
        return set(self._ail)

    def ail_image(self, blkno: int) -> bytes | None:
        """The committed image of `blkno` not yet written in place, if any."""
        item = self._ail.get(blkno)
        return None if item is None else item.image

    def _tail(self, header_position: int) -> int:
        """Tail for a header written at `header_position`: the oldest transaction
        still in the AIL, or the header itself when nothing needs replaying."""
        for start in self._txn_blocks:
            return start
        return header_position

    def free_blocks(self) -> int:
        """Log blocks a commit may use now without a checkpoint (one block is kept
        back so a checkpoint can always write its header)."""
        return self._disk_tail + self._size - self._head - 1

    def used_fraction(self) -> float:
        """How much of the ring holds log that replay may still need."""
        return (self._head - self._disk_tail) / self._size

    async def run_log_daemon(self, *, interval: float = 1.0, ail_threshold: float = 0.5) -> None:
        """Background duty, like the kernel's log daemon and buffer write-back: every
        `interval` seconds commit the running transaction and write the AIL back in
        place; once the log is more than `ail_threshold` full also write a header
        that moves the tail, so commits seldom wait for a forced checkpoint.
        Returns when the journal is unmounted or withdrawn; run it in a nursery."""
        while True:
            await trio.sleep(interval)
            if self._closed or self._failed is not None:
                return
            try:
                await self.flush(flags=LH_FLUSH_NORMAL)
                await self.write_back()
                if self.used_fraction() > ail_threshold:
                    await self.checkpoint()
            except JournalError:
                return  # unmounted or withdrawn meanwhile; the caller sees why

    # ------------------------------------------------------------------ helpers

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise JournalWithdrawnError(f"{self.name}: withdrawn after {self._failed!r}")
        if self._closed:
            raise JournalError(f"{self.name}: already unmounted")

    async def _write_log(self, position: int, blocks: list[bytes]) -> None:
        """Write consecutive log blocks starting at log position `position`."""
        await write_log_blocks(self.device, self.extents, position % self._size, blocks)

    async def _write_in_place(self, images: dict[int, bytes]) -> None:
        await write_home_blocks(self.device, self.bsize, images)

    async def _write_header(self, flags: int, *, tail: int | None = None) -> None:
        """Write the next log header at the head and flush it."""
        pos = self._head
        tail_pos = self._tail(pos) if tail is None else tail
        now = time.time_ns()
        block = build_log_header(
            self.bsize,
            jid=self.jid,
            sequence=self._next_sequence,
            flags=flags,
            tail=tail_pos % self._size,
            blkno=pos % self._size,
            sec=now // 1_000_000_000,
            nsec=now % 1_000_000_000,
            addr=self.extents.device_block(pos % self._size),
            jinode=self.extents.dinode_addr,
            statfs_addr=self.statfs_addr,
            quota_addr=self.quota_addr,
            local=(self.statfs_local[0], self.statfs_local[1], self.statfs_local[2]),
        )
        await self._write_log(pos, [block])
        await self.device.flush()
        self._last_header = pos
        self._disk_tail = tail_pos
        self._head = pos + 1
        self._next_sequence += 1
        if tail_pos == pos:
            self._logged_at.clear()  # nothing before this header will ever be replayed
        elif len(self._logged_at) > 4 * self._size:
            self._logged_at = {b: p for b, p in self._logged_at.items() if p >= tail_pos}

    def _needs_revoke(self, blkno: int) -> bool:
        """True when a copy of `blkno` lies in the part of the log replay would read."""
        pos = self._logged_at.get(blkno)
        return pos is not None and pos >= self._disk_tail

    def _drop_from_ail(self, blkno: int) -> None:
        item = self._ail.pop(blkno, None)
        if item is None:
            return
        members = self._txn_blocks[item.txn_start]
        members.discard(blkno)
        if not members:
            del self._txn_blocks[item.txn_start]

    async def _guarded(self, work: Awaitable[None]) -> None:
        """Run one write sequence to its end, shielded from cancellation (an
        interrupted FUSE request must not leave the log half-updated); any failure
        withdraws the journal, because what reached the disk is no longer known."""
        with trio.CancelScope(shield=True):
            try:
                await work
            except BaseException as e:
                self._failed = e
                log.error("%s: withdrawn: %r", self.name, e)
                raise

    # ------------------------------------------------------------------ commits

    def _check_blocks(self, txn: Transaction) -> None:
        if txn.bsize != self.bsize:
            raise ValueError(f"transaction block size {txn.bsize} != journal {self.bsize}")
        dev_blocks = self.device.size // self.bsize
        beyond = [b for b in txn.blocks | txn.revokes if b >= dev_blocks]
        if beyond:
            raise ValueError(f"{self.name}: block {min(beyond)} is beyond the device")

    def _log_size(self, txn: Transaction) -> int:
        return log_blocks_needed(self.bsize, len(txn.jdata), len(txn.metadata), len(txn.revokes))

    async def add(self, txn: Transaction, *, ordered: OrderedHook | None = None) -> None:
        """Merge `txn` into the running transaction without writing anything.

        It becomes durable with the next `flush` (or `commit`, `sync_blocks`,
        `checkpoint`, `clean_unmount`): many small filesystem operations then share
        one log write and its two device flushes. `ordered` hooks accumulate and all
        run before that flush's commit header. When the running transaction would
        grow past half the journal it is flushed first, so it always fits.
        """
        self._check_blocks(txn)
        self._check_usable()
        if self._running and self._log_size(self._running) + self._log_size(txn) > self._size // 2:
            await self.flush()
        self._running.merge(txn)
        if ordered is not None:
            self._running_hooks.append(ordered)

    def pending_image(self, blkno: int) -> bytes | None:
        """The image of `blkno` in the running (not yet durable) transaction."""
        return self._running.metadata.get(blkno) or self._running.jdata.get(blkno)

    async def flush(self, *, flags: int = LH_FLUSH_NORMAL) -> int:
        """Commit the running transaction (see `commit`); return the sequence of the
        newest header. Concurrent callers share one commit: whoever finds the running
        transaction already written by another caller returns at once."""
        async with self._lock:
            self._check_usable()
            return await self._flush_locked(flags)

    async def _flush_locked(self, flags: int) -> int:
        txn, hooks = self._running, self._running_hooks
        if not txn and not hooks:
            return self._next_sequence - 1
        self._running, self._running_hooks = Transaction(self.bsize), []

        async def run_hooks() -> None:
            for hook in hooks:
                await hook()

        return await self._commit_txn_locked(txn, run_hooks if hooks else None, flags)

    async def commit(
        self,
        txn: Transaction,
        *,
        ordered: OrderedHook | None = None,
        flags: int = LH_FLUSH_NORMAL,
    ) -> int:
        """Write `txn` (with anything added before it) to the log and make it durable;
        return its header's sequence.

        Layout: [JDATA descriptors + escaped copies][METADATA descriptors + copies,
        sorted][REVOKE descriptor + continuation blocks], flush, then one header,
        flush. `ordered`, if given, is awaited after the body is written and before
        the flush that precedes the header: that is where ordered-mode file data is
        written in place, so the header can never be durable before the data it
        describes. A commit that does not fit checkpoints first.
        """
        await self.add(txn, ordered=ordered)
        return await self.flush(flags=flags)

    async def _commit_txn_locked(
        self, txn: Transaction, ordered: OrderedHook | None, flags: int
    ) -> int:
        revokes = sorted(b for b in txn.revokes if self._needs_revoke(b))
        body = build_log_body(self.bsize, txn.jdata, txn.metadata, revokes)
        if len(body.blocks) + 1 > self._size - 2:
            raise JournalFullError(
                f"{self.name}: transaction needs {len(body.blocks) + 1} log blocks, "
                f"an empty journal holds {self._size - 2}"
            )
        if not body.blocks and not any(txn.statfs_delta):
            for blkno in txn.revokes:  # nothing of them in the live log; just forget
                self._drop_from_ail(blkno)
            if ordered is not None:  # no log write, but the data must still be durable
                await self._guarded(self._ordered_only(ordered))
            return self._next_sequence - 1
        await self._guarded(self._commit_locked(txn, body, ordered, flags))
        return self._next_sequence - 1

    async def _ordered_only(self, ordered: OrderedHook) -> None:
        await ordered()
        await self.device.flush()

    async def _commit_locked(
        self, txn: Transaction, body: LogBody, ordered: OrderedHook | None, flags: int
    ) -> None:
        need = len(body.blocks) + 1
        if need > self.free_blocks():
            self.forced_checkpoints += 1
            await self._checkpoint_locked()
        start = self._head
        if body.blocks:
            await self._write_log(start, body.blocks)
        if ordered is not None:
            await ordered()
        await self.device.flush()
        self._head = start + len(body.blocks)
        # Freed blocks must never be written in place from the AIL again.
        for blkno in txn.revokes:
            self._drop_from_ail(blkno)
            self._logged_at.pop(blkno, None)
        for blkno, index in body.copies.items():
            image = txn.metadata.get(blkno)
            if image is None:
                image = txn.jdata[blkno]
            self._drop_from_ail(blkno)
            self._ail[blkno] = _AilItem(image, start)
            self._txn_blocks.setdefault(start, set()).add(blkno)
            self._logged_at[blkno] = start + index
        for i, delta in enumerate(txn.statfs_delta):
            self.statfs_local[i] += delta
        await self._write_header(flags)
        self.commits += 1
        if len(self._ail) > self.max_ail_blocks:
            await self._write_back_oldest_locked(len(self._ail) - self.max_ail_blocks // 2)
        log.debug(
            "%s: committed sequence %d: %d metadata, %d jdata, %d revokes in %d blocks",
            self.name,
            self._next_sequence - 1,
            len(txn.metadata),
            len(txn.jdata),
            len(body.revokes),
            len(body.blocks) + 1,
        )

    # --------------------------------------------------------------- write-back

    async def write_back(self, blocks: Iterable[int] | None = None) -> int:
        """Write committed blocks in place (all of the AIL when `blocks` is None),
        flush, and drop them from the AIL. The tail this frees is recorded by the
        next header. Returns how many blocks were written."""
        async with self._lock:
            self._check_usable()
            count = 0

            async def work() -> None:
                nonlocal count
                count = await self._write_back_locked(blocks)

            await self._guarded(work())
            return count

    async def _write_back_locked(self, blocks: Iterable[int] | None) -> int:
        wanted = list(self._ail) if blocks is None else [b for b in blocks if b in self._ail]
        if not wanted:
            return 0
        await self._write_in_place({b: self._ail[b].image for b in wanted})
        await self.device.flush()
        for blkno in wanted:
            self._drop_from_ail(blkno)
        return len(wanted)

    async def _write_back_oldest_locked(self, count: int) -> None:
        """Write back whole transactions, oldest first, until `count` blocks left the
        AIL: bounds the memory the AIL pins and moves the tail as far as possible."""
        chosen: list[int] = []
        for members in self._txn_blocks.values():
            if len(chosen) >= count:
                break
            chosen.extend(members)
        await self._write_back_locked(chosen)

    async def checkpoint(self) -> None:
        """Write the whole AIL in place, then a header whose tail is itself, so all
        log space becomes reusable and nothing is left to replay."""
        async with self._lock:
            self._check_usable()
            await self._flush_locked(LH_FLUSH_NORMAL)
            await self._guarded(self._checkpoint_locked())

    async def _checkpoint_locked(self) -> None:
        # Never flushes the running transaction: a forced checkpoint runs in the
        # middle of a commit, and what was added since must be committed after it.
        await self._write_back_locked(None)
        self.checkpoints += 1
        if self._disk_tail != self._last_header:
            await self._write_header(LH_FLUSH_NORMAL)
            log.debug("%s: checkpoint, tail now at block %d", self.name, self.head_block - 1)

    async def sync_blocks(self, blocks: Iterable[int]) -> None:
        """What a glock demotion from EX asks of the journal for the lock's blocks:
        write them in place, then revoke their copies still in the live log, so a
        later replay of this journal cannot overwrite another node's newer writes."""
        wanted = set(blocks)
        async with self._lock:
            self._check_usable()
            await self._flush_locked(LH_FLUSH_NORMAL)

            async def work() -> None:
                await self._write_back_locked(wanted)

            await self._guarded(work())
            live = {b for b in wanted if self._needs_revoke(b)}
            if live:
                txn = Transaction(self.bsize)
                for blkno in live:
                    txn.revoke(blkno)
                await self._commit_txn_locked(txn, None, LH_FLUSH_NORMAL)

    async def clean_unmount(self) -> None:
        """Write back everything, then the UNMOUNT header (tail = its own block) and
        flush: the journal is clean and the filesystem consistent in place."""
        async with self._lock:
            self._check_usable()
            await self._flush_locked(LH_FLUSH_NORMAL)

            async def work() -> None:
                await self._write_back_locked(None)
                if self.free_blocks() < 0:  # cannot happen: one block is kept back
                    raise JournalError(f"{self.name}: no room for the unmount header")
                await self._write_header(LH_UNMOUNT | LFC_SHUTDOWN, tail=self._head)

            await self._guarded(work())
            self._closed = True
            log.info("%s: clean unmount at block %d", self.name, self._last_header % self._size)


async def open_journal(device: Device, jid: int, *, replay_if_dirty: bool = False) -> Journal:
    """Open journal `jid` of the filesystem on `device`, finding its files by name.

    With `replay_if_dirty` (what mount does for its own journal) a dirty journal is
    first replayed, folding its statfs deltas as the kernel does.
    """
    if replay_if_dirty:
        await recover_journal(device, jid)
    files = await locate_journal(device, jid)
    return await Journal.open(
        device,
        files.bsize,
        files.journal,
        jid=jid,
        statfs_addr=files.statfs_change,
        quota_addr=files.quota_change,
    )
