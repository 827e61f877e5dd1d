"""Rules of transactions and extents (pure), and what the writer and replay refuse."""

from __future__ import annotations

import errno
import functools
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from gfspy.blockdev.device import Device, DeviceError
from gfspy.blockdev.local import LocalDevice
from gfspy.journal.extent import JournalExtents, JournalLayoutError
from gfspy.journal.log import JournalFullError, JournalWithdrawnError, open_journal
from gfspy.journal.replay import ReplayError, recover_journal, replay_journal
from gfspy.journal.status import journal_status
from gfspy.journal.transaction import Transaction, TransactionError
from gfspy.ondisk.constants import DINODE_SIZE, LD_METADATA, METATYPE_LH
from gfspy.ondisk.meta import MetaHeader

from .helpers import (
    BSIZE,
    data_block,
    free_blocks,
    fsck,
    journal0,
    make_image,
    metadata_block,
    open_device,
    read_block,
    replay_counts,
)


@pytest.mark.timeout(10)
def test_transaction_last_word_wins() -> None:
    t = Transaction(BSIZE)
    t.add_metadata(10, metadata_block(10, 1))
    t.revoke(10)
    assert t.metadata == {} and t.revokes == {10}
    t.add_jdata(10, data_block(1))  # reused as journaled data: the revoke must go
    assert t.revokes == set() and set(t.jdata) == {10}
    t.add_metadata(10, metadata_block(10, 2))
    assert t.jdata == {} and t.metadata[10] == metadata_block(10, 2)
    assert t.blocks == {10}


@pytest.mark.timeout(10)
def test_transaction_refuses_what_replay_could_not_handle() -> None:
    t = Transaction(BSIZE)
    with pytest.raises(TransactionError, match="magic"):
        t.add_metadata(5, data_block(1))
    header = MetaHeader.for_type(METATYPE_LH).pack().ljust(BSIZE, b"\0")
    with pytest.raises(TransactionError, match="LH"):
        t.add_metadata(5, header)
    with pytest.raises(TransactionError, match="block size"):
        t.add_metadata(5, metadata_block(5, 1)[:512])
    with pytest.raises(TransactionError):
        t.revoke(0)
    assert not t


@pytest.mark.timeout(10)
def test_extents_split_io_at_run_and_ring_boundaries() -> None:
    ext = JournalExtents(7, BSIZE, ((100, 4), (50, 3), (200, 5)))
    assert ext.blocks == 12
    assert [ext.device_block(i) for i in range(12)] == [
        100, 101, 102, 103, 50, 51, 52, 200, 201, 202, 203, 204
    ]  # fmt: skip
    assert ext.device_runs(2, 4) == [(0, 102, 2), (2, 50, 2)]
    assert ext.device_runs(10, 5) == [(0, 203, 2), (2, 100, 3)]  # wraps to block 0
    with pytest.raises(IndexError):
        ext.device_block(12)


async def dirty_image(tmp_path: Path) -> tuple[Path, int, list[int]]:
    """An image whose journal0 holds one committed, unreplayed transaction.

    Returns the image, the journal block of the transaction's descriptor and the
    logged blocks."""
    image = make_image(tmp_path / "fs.img")
    dev = await open_device(image)
    try:
        blocks = await free_blocks(dev, 3)
        journal = await open_journal(dev, 0)
        start = journal.head_block
        t = Transaction(BSIZE)
        for blk in blocks:
            t.add_metadata(blk, metadata_block(blk, 1))
        await journal.commit(t)
    finally:
        await dev.aclose()
    return image, start, blocks


async def corrupt_log_block(image: Path, jblock: int, offset: int, data: bytes) -> None:
    dev = await open_device(image)
    try:
        _, extents = await journal0(dev)
        addr = extents.device_block(jblock) * BSIZE
        raw = bytearray(await dev.read(addr, BSIZE))
        raw[offset : offset + len(data)] = data
        await dev.write(addr, bytes(raw))
    finally:
        await dev.aclose()


async def assert_replay_refused(image: Path, match: str) -> None:
    before = image.read_bytes()
    dev = await open_device(image)
    try:
        _, extents = await journal0(dev)
        with pytest.raises(ReplayError, match=match):
            await replay_journal(dev, extents, jid=0)
    finally:
        await dev.aclose()
    assert image.read_bytes() == before, "a refused replay must not write anything"


@pytest.mark.timeout(60)
async def test_replay_refuses_metadata_copy_without_magic(tmp_path: Path) -> None:
    image, start, _ = await dirty_image(tmp_path)
    await corrupt_log_block(image, start + 2, 0, b"\0\0\0\0")
    await assert_replay_refused(image, "lacks the GFS2 magic")


@pytest.mark.timeout(60)
async def test_replay_refuses_malformed_descriptors(tmp_path: Path) -> None:
    image, start, _ = await dirty_image(tmp_path)
    pristine = tmp_path / "pristine.img"
    shutil.copyfile(image, pristine)
    await corrupt_log_block(image, start, 28, struct.pack(">I", 50))  # ld_length
    await assert_replay_refused(image, "past the head")

    shutil.copyfile(pristine, image)
    await corrupt_log_block(image, start, 24, struct.pack(">I", 399))  # ld_type
    await assert_replay_refused(image, "unknown type 399")

    shutil.copyfile(pristine, image)
    await corrupt_log_block(image, start, 24, struct.pack(">III", LD_METADATA, 4, 2))
    await assert_replay_refused(image, "length 4 for 2 blocks")


@pytest.mark.timeout(60)
async def test_oversized_transaction_is_refused_without_harm(tmp_path: Path) -> None:
    image = make_image(tmp_path / "fs.img")
    dev = await open_device(image)
    try:
        journal = await open_journal(dev, 0)
        t = Transaction(BSIZE)
        for blk in range(1, journal.journal_blocks):
            t.add_metadata(3_000 + blk, metadata_block(3_000 + blk, 0))
        with pytest.raises(JournalFullError):
            await journal.commit(t)
        far = Transaction(BSIZE)
        far.add_metadata(1 << 40, metadata_block(1 << 40, 0))
        with pytest.raises(ValueError, match="beyond the device"):
            await journal.commit(far)
        small = Transaction(BSIZE)
        (blk,) = await free_blocks(dev, 1)
        small.add_metadata(blk, metadata_block(blk, 1))
        await journal.commit(small)  # the journal is still usable
        await journal.clean_unmount()
    finally:
        await dev.aclose()
    assert not fsck(image, "-n").dirty


@pytest.mark.timeout(60)
async def test_sync_blocks_protects_another_nodes_later_write(tmp_path: Path) -> None:
    """The glock contract: after sync_blocks (EX demotion), another node may write
    the block in place; replaying our journal afterwards must not undo that."""
    image = make_image(tmp_path / "fs.img")
    dev = await open_device(image)
    try:
        a, b = await free_blocks(dev, 2)
        journal = await open_journal(dev, 0)
        t = Transaction(BSIZE)
        t.add_metadata(a, metadata_block(a, 1))
        t.add_metadata(b, metadata_block(b, 1))
        await journal.commit(t)
        await journal.sync_blocks([a])
        assert read_block(image, a) == metadata_block(a, 1)
        assert journal.ail_blocks == {b}
        await dev.write(a * BSIZE, metadata_block(a, 2))  # the other node's write
        await dev.flush()
    finally:
        await dev.aclose()  # crash: journal left dirty
    run = fsck(image, "-y")
    assert replay_counts(run.output)[0] == (1, 2)
    assert read_block(image, a) == metadata_block(a, 2)
    assert read_block(image, b) == metadata_block(b, 1)


@pytest.mark.timeout(60)
async def test_large_transaction_spans_several_descriptors(tmp_path: Path) -> None:
    """More items than one descriptor holds: 2 METADATA and 2 JDATA descriptors, and
    a revoke list continued in an LB block; fsck.gfs2 and our replay agree."""
    image = make_image(tmp_path / "fs.img")
    dev = await open_device(image)
    try:
        pool = await free_blocks(dev, 900, spacing=1)
        meta, jdata = pool[:600], pool[600:]
        journal = await open_journal(dev, 0)
        t1 = Transaction(BSIZE)
        for blk in meta:
            t1.add_metadata(blk, metadata_block(blk, 1))
        for blk in jdata:
            t1.add_jdata(blk, data_block(blk, starts_with_magic=blk % 2 == 0))
        await journal.commit(t1)
        t2 = Transaction(BSIZE)
        for blk in meta[:550] + jdata[:200]:
            t2.revoke(blk)
        await journal.commit(t2)
    finally:
        await dev.aclose()
    by_fsck = tmp_path / "by-fsck.img"
    shutil.copyfile(image, by_fsck)
    run = fsck(by_fsck, "-y")
    assert replay_counts(run.output) == ((50, 600), (100, 300))
    for blk in meta[550:]:
        assert read_block(by_fsck, blk) == metadata_block(blk, 1)
    for blk in jdata[200:]:
        assert read_block(by_fsck, blk) == data_block(blk, starts_with_magic=blk % 2 == 0)
    dev = await open_device(image)
    try:
        _, extents = await journal0(dev)
        result = await replay_journal(dev, extents, jid=0, header_style="fsck")
        assert result.revokes == 750
    finally:
        await dev.aclose()
    assert image.read_bytes() == by_fsck.read_bytes()


class FailingDevice(Device):
    """A real image whose writes start failing with EIO after `writes_left` of them:
    the only way to make a local disk fail on cue (error injection, not a mock of
    the journal's I/O, which still goes to the real file until the failure)."""

    def __init__(self, inner: LocalDevice, writes_left: int) -> None:
        self.inner = inner
        self.writes_left = writes_left
        self.on_write: Callable[[], None] | None = None
        self.size = inner.size
        self.block_size = inner.block_size
        self.name = inner.name

    async def read(self, offset: int, length: int) -> bytes:
        return await self.inner.read(offset, length)

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.writes_left <= 0:
            raise DeviceError(errno.EIO, f"{self.name}: injected write failure")
        self.writes_left -= 1
        if self.on_write is not None:
            self.on_write()
        await self.inner.write(offset, data)

    async def flush(self) -> None:
        await self.inner.flush()

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.timeout(60)
async def test_io_failure_withdraws_the_journal(tmp_path: Path) -> None:
    image = make_image(tmp_path / "fs.img")
    before = image.read_bytes()
    dev = FailingDevice(await LocalDevice.open(str(image)), writes_left=1_000)
    try:
        (a, b) = await free_blocks(dev, 2)
        journal = await open_journal(dev, 0)
        t = Transaction(BSIZE)
        t.add_metadata(a, metadata_block(a, 1))
        t.add_metadata(b, metadata_block(b, 1))
        dev.writes_left = 0
        with pytest.raises(DeviceError):
            await journal.commit(t)
        with pytest.raises(JournalWithdrawnError):
            await journal.commit(t)
        with pytest.raises(JournalWithdrawnError):
            await journal.clean_unmount()
    finally:
        await dev.aclose()
    assert image.read_bytes() == before  # nothing reached the disk, journal clean
    assert not fsck(image, "-n").dirty


@pytest.mark.timeout(60)
async def test_statfs_deltas_survive_a_clean_unmount(tmp_path: Path) -> None:
    """Deltas not yet folded into the master statfs live in the headers; a remount
    must carry them on, not restart from zero."""
    image = make_image(tmp_path / "fs.img")
    dev = await open_device(image)
    try:
        journal = await open_journal(dev, 0)
        t = Transaction(BSIZE)
        t.change_statfs(total=0, free=-2, dinodes=1)
        await journal.commit(t)
        await journal.clean_unmount()
        again = await open_journal(dev, 0)
        assert again.statfs_local == [0, -2, 1]
        t = Transaction(BSIZE)
        t.change_statfs(free=-1)
        await again.commit(t)
        assert again.statfs_local == [0, -3, 1]
    finally:
        await dev.aclose()


@pytest.mark.timeout(60)
async def test_group_commit_shares_log_writes_and_keeps_order(tmp_path: Path) -> None:
    image = make_image(tmp_path / "fs.img")
    dev = await open_device(image)
    try:
        pool = await free_blocks(dev, 21)
        journal = await open_journal(dev, 0)
        last = pool[20]
        early = Transaction(BSIZE)
        early.add_metadata(last, metadata_block(last, 1))
        await journal.add(early)  # not durable yet
        assert journal.pending_image(last) == metadata_block(last, 1)
        assert journal.commits == 0

        async def operation(blk: int) -> None:
            t = Transaction(BSIZE)
            t.add_metadata(blk, metadata_block(blk, 5))
            await journal.add(t)
            await journal.flush()

        async with trio.open_nursery() as nursery:
            for blk in pool[:20]:
                nursery.start_soon(operation, blk)
        assert 1 <= journal.commits < 20, "concurrent flushes must share commits"
        later = Transaction(BSIZE)
        later.add_metadata(last, metadata_block(last, 2))
        await journal.commit(later)
        assert journal.pending_image(last) is None
    finally:
        await dev.aclose()  # crash
    run = fsck(image, "-y")
    (replayed, logged), _ = replay_counts(run.output)
    assert replayed == logged >= 21
    for blk in pool[:20]:
        assert read_block(image, blk) == metadata_block(blk, 5)
    assert read_block(image, last) == metadata_block(last, 2)


@pytest.mark.timeout(60)
async def test_cancelled_commit_still_completes_and_journal_stays_usable(
    tmp_path: Path,
) -> None:
    """A FUSE request interrupted while its commit is being written must not leave
    the log half-written or withdraw the journal."""
    image = make_image(tmp_path / "fs.img")
    dev = FailingDevice(await LocalDevice.open(str(image)), writes_left=1_000)
    try:
        a, b = await free_blocks(dev, 2)
        journal = await open_journal(dev, 0)
        t = Transaction(BSIZE)
        t.add_metadata(a, metadata_block(a, 1))
        with trio.CancelScope() as scope:
            dev.on_write = scope.cancel  # cancel as soon as the body is being written
            await journal.commit(t)
            await trio.sleep(0)  # the cancellation lands here, after the commit
        dev.on_write = None
        assert scope.cancelled_caught
        assert journal.ail_blocks == {a}, "the interrupted commit completed"
        t = Transaction(BSIZE)
        t.add_metadata(b, metadata_block(b, 1))
        await journal.commit(t)
        await journal.clean_unmount()
    finally:
        await dev.aclose()
    assert read_block(image, a) == metadata_block(a, 1)
    assert read_block(image, b) == metadata_block(b, 1)
    assert not fsck(image, "-n").dirty


@pytest.mark.timeout(60)
async def test_log_daemon_commits_and_writes_back_in_the_background(tmp_path: Path) -> None:
    image = make_image(tmp_path / "fs.img")
    dev = await open_device(image)
    try:
        pool = await free_blocks(dev, 300, spacing=1)
        journal = await open_journal(dev, 0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(journal.run_log_daemon, interval=0.01))
            for i in range(0, 300, 30):  # 10 operations that never flush themselves
                t = Transaction(BSIZE)
                for blk in pool[i : i + 30]:
                    t.add_metadata(blk, metadata_block(blk, 1))
                await journal.add(t)
                while journal.pending_image(pool[i]) is not None:
                    await trio.sleep(0.01)  # until the daemon committed it
            while journal.ail_blocks:
                await trio.sleep(0.01)  # until the daemon wrote everything back
            # Written back promptly, each commit's header could move the tail up: the
            # log never filled although 10 transactions went through it.
            assert journal.used_fraction() < 0.1
            assert journal.forced_checkpoints == 0
            await journal.clean_unmount()  # the daemon then stops by itself
    finally:
        await dev.aclose()
    for blk in pool:
        assert read_block(image, blk) == metadata_block(blk, 1)
    assert not fsck(image, "-n").dirty


@pytest.mark.timeout(60)
async def test_ordered_data_is_written_even_when_nothing_is_logged(tmp_path: Path) -> None:
    """fsync of a file whose metadata did not change still makes its data durable."""
    image = make_image(tmp_path / "fs.img")
    dev = await open_device(image)
    try:
        (blk,) = await free_blocks(dev, 1)
        journal = await open_journal(dev, 0)

        async def write_data() -> None:
            await dev.write(blk * BSIZE, data_block(11))

        await journal.add(Transaction(BSIZE), ordered=write_data)
        sequence = journal.next_sequence
        await journal.flush()
        assert journal.next_sequence == sequence, "no log write for an empty transaction"
    finally:
        await dev.aclose()
    assert read_block(image, blk) == data_block(11)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("hole", "hole at journal block"),
        ("twice", "mapped twice"),
        ("not_indirect", "expected IN block"),
        ("beyond", "beyond device"),
    ],
)
async def test_journal_tree_that_cannot_be_trusted_is_refused(
    tmp_path: Path, damage: str, message: str
) -> None:
    image = make_image(tmp_path / "fs.img")
    dev = await open_device(image)
    try:
        files, _ = await journal0(dev)
        raw = bytearray(await dev.read(files.journal * BSIZE, BSIZE))
        (first_in,) = struct.unpack_from(">Q", raw, DINODE_SIZE)
        if damage == "hole":
            struct.pack_into(">Q", raw, DINODE_SIZE + 8, 0)
        elif damage == "twice":
            struct.pack_into(">Q", raw, DINODE_SIZE + 8, first_in)
        elif damage == "not_indirect":
            struct.pack_into(">Q", raw, DINODE_SIZE + 8, files.journal)  # the dinode
        else:
            struct.pack_into(">Q", raw, DINODE_SIZE + 8, 1 << 40)
        await dev.write(files.journal * BSIZE, bytes(raw))
        with pytest.raises(JournalLayoutError, match=message):
            await open_journal(dev, 0)
        with pytest.raises(JournalLayoutError, match=message):
            await recover_journal(dev, 0)
    finally:
        await dev.aclose()


@pytest.mark.timeout(60)
async def test_status_reports_what_a_replay_would_find(tmp_path: Path) -> None:
    image = make_image(tmp_path / "fs.img")
    dev = await open_device(image)
    try:
        fresh = await journal_status(dev, 0)
        assert fresh.clean and fresh.live_blocks == 0 and not fresh.problems
        assert fresh.blocks == 2048 and fresh.runs == 1
        journal = await open_journal(dev, 0)
        a, b = await free_blocks(dev, 2)
        t = Transaction(BSIZE)
        t.add_metadata(a, metadata_block(a, 1))
        t.add_metadata(b, metadata_block(b, 1))
        t.change_statfs(free=-2)
        await journal.commit(t)
        dirty = await journal_status(dev, 0)
        assert not dirty.clean
        assert dirty.live_blocks == 3  # descriptor + two copies
        assert fresh.sequence is not None and dirty.sequence == fresh.sequence + 1
        assert dirty.statfs_local == (0, -2, 0)
        assert "DIRTY" in dirty.summary()
        await journal.clean_unmount()
        assert (await journal_status(dev, 0)).clean
    finally:
        await dev.aclose()


@pytest.mark.timeout(60)
async def test_ail_memory_is_bounded_by_writing_back_oldest(tmp_path: Path) -> None:
    image = make_image(tmp_path / "fs.img")
    dev = await open_device(image)
    try:
        pool = await free_blocks(dev, 200, spacing=1)
        journal = await open_journal(dev, 0)
        journal.max_ail_blocks = 50
        for n in range(10):
            t = Transaction(BSIZE)
            for blk in pool[n * 20 : (n + 1) * 20]:
                t.add_metadata(blk, metadata_block(blk, n))
            await journal.commit(t)
            assert len(journal.ail_blocks) <= 50
        assert journal.ail_blocks <= set(pool[100:]), "the oldest went back first"
        assert await dev.read(pool[0] * BSIZE, BSIZE) == metadata_block(pool[0], 0)
    finally:
        await dev.aclose()  # crash
    assert fsck(image, "-y").returncode in (0, 1)
    for n in range(10):
        for blk in pool[n * 20 : (n + 1) * 20]:
            assert read_block(image, blk) == metadata_block(blk, n)
