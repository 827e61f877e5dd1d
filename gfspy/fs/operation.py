"""The frame every filesystem operation runs in: the mount lock, a transaction, and
what happens at the end (stage the changes, release glocks, flush when due).

A class rather than an @asynccontextmanager generator: every create or lookup goes
through it, and the generator machinery was a measurable share of their cost.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import TYPE_CHECKING

import trio

from gfspy.fs.txn import FsTxn
from gfspy.fs.types import FsError, FsWithdrawn

if TYPE_CHECKING:
    from gfspy.fs.filesystem import FileSystem


def release_holders(txn: FsTxn) -> None:
    for holder in txn.holders:
        holder.glock.release(holder)
    txn.holders.clear()
    txn.held.clear()


class Operation:
    """`async with Operation(fs, write) as txn:` - one filesystem operation.

    A modifying operation cannot be cancelled (a change interrupted half way would
    leave the cached metadata inconsistent). An FsError ends it with what it changed
    so far staged; any other exception withdraws the mount."""

    __slots__ = ("fs", "write", "txn", "shield")

    def __init__(self, fs: FileSystem, write: bool) -> None:
        self.fs = fs
        self.write = write
        self.txn = FsTxn()
        self.shield: trio.CancelScope | None = None

    async def __aenter__(self) -> FsTxn:
        fs = self.fs
        fs._check_alive(self.write)
        # Uncontended (the common case) the lock is taken without trio's checkpoint:
        # a trip through the scheduler per operation is a measurable share of a
        # create. The request loop around every operation checkpoints anyway.
        if fs._lock.locked():
            await fs._lock.acquire()
        else:
            fs._lock.acquire_nowait()
        try:
            fs._check_alive(self.write)
            if self.write:
                self.shield = trio.CancelScope(shield=True)
                self.shield.__enter__()
        except BaseException:
            fs._lock.release()
            raise
        return self.txn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        try:
            try:
                if exc is None:
                    try:
                        await self._finish()
                    except BaseException as e:
                        await self._ended_by(e)
                        raise
                else:
                    await self._ended_by(exc)
            finally:
                release_holders(self.txn)
                if self.shield is not None:
                    self.shield.__exit__(None, None, None)
        finally:
            self.fs._lock.release()
        return False

    async def _finish(self) -> None:
        fs, txn = self.fs, self.txn
        if txn:
            await fs._commit(txn)
        release_holders(txn)
        while fs._deferred_frees:
            await fs._free_deferred(fs._deferred_frees.pop())
        if self.write and time.monotonic() - fs._last_flush >= fs.commit_interval:
            await fs._flush()

    async def _ended_by(self, exc: BaseException) -> None:
        """An FsError keeps what the operation changed so far (staged); any other
        exception withdraws the mount (raised from here in its place)."""
        if isinstance(exc, FsWithdrawn):
            return
        if isinstance(exc, FsError):
            if self.txn:
                await self.fs._commit(self.txn)
        elif isinstance(exc, Exception):
            raise self.fs._withdraw(f"{type(exc).__name__}: {exc}") from exc
