"""Glock: the locally cached state of one cluster lock (type, number) and its holders.

A glock stays in the state it was granted after its holders go away (that is the
cache); it is only demoted when another node asks (blocking callback) or the cache is
trimmed. Demotion runs the type's `go_sync` (write back what the lock protected)
before giving the lock up and `go_inval` (drop cached copies) after, which is the
whole of cache coherence in GFS2.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from gfspy.glock.lockmodule import LockModule

log = logging.getLogger(__name__)

LM_ST_UNLOCKED = 0
LM_ST_EXCLUSIVE = 1
LM_ST_DEFERRED = 2
LM_ST_SHARED = 3

STATE_NAMES = {
    LM_ST_UNLOCKED: "UN",
    LM_ST_EXCLUSIVE: "EX",
    LM_ST_DEFERRED: "DF",
    LM_ST_SHARED: "SH",
}

# Glock types (GFS2 lock name types).
LM_TYPE_NONDISK = 1
LM_TYPE_INODE = 2
LM_TYPE_RGRP = 3
LM_TYPE_META = 4
LM_TYPE_IOPEN = 5
LM_TYPE_FLOCK = 6
LM_TYPE_QUOTA = 8
LM_TYPE_JOURNAL = 9


def compatible(held: int, wanted: int) -> bool:
    """Whether a glock in state `held` already satisfies a holder wanting `wanted`."""
    if held == LM_ST_EXCLUSIVE:
        return wanted in (LM_ST_EXCLUSIVE, LM_ST_SHARED)
    return held == wanted


@dataclass
class GlockOps:
    """Per-type hooks. go_sync writes back (before demoting from EX); go_inval drops
    cached state (after demoting to a state that lets others write)."""

    name: str
    go_sync: Callable[[Glock], Awaitable[None]] | None = None
    go_inval: Callable[[Glock], Awaitable[None]] | None = None


@dataclass(eq=False)
class Holder:
    """One request on a glock by one operation."""

    glock: Glock
    state: int


@dataclass(eq=False)
class Glock:
    gl_type: int
    number: int
    ops: GlockOps
    table: GlockTable
    state: int = LM_ST_UNLOCKED
    holders: list[Holder] = field(default_factory=list)
    _changed: trio.Event = field(default_factory=trio.Event)

    def __str__(self) -> str:
        return f"{self.ops.name}:{self.number:x}[{STATE_NAMES[self.state]}]"

    def _conflicts(self, wanted: int) -> bool:
        """A local holder in a mode that excludes `wanted` (EX excludes everyone)."""
        for holder in self.holders:
            if holder.state == LM_ST_EXCLUSIVE or wanted == LM_ST_EXCLUSIVE:
                return True
            if holder.state != wanted:
                return True
        return False

    async def acquire(self, wanted: int) -> Holder:
        """Queue a holder and wait until it is granted (local and cluster-wide)."""
        while self._conflicts(wanted):
            event = self._changed
            await event.wait()
        holder = Holder(self, wanted)
        self.holders.append(holder)
        try:
            if not compatible(self.state, wanted):
                await self._change_state(wanted)
        except BaseException:
            self.holders.remove(holder)
            self._wake()
            raise
        return holder

    def release(self, holder: Holder) -> None:
        """Drop a holder; the glock keeps its state (cached) for the next user."""
        self.holders.remove(holder)
        self._wake()

    def _wake(self) -> None:
        if self._changed.statistics().tasks_waiting:  # nobody waits: keep the event
            self._changed.set()
            self._changed = trio.Event()

    async def _change_state(self, wanted: int) -> None:
        if self.state == LM_ST_EXCLUSIVE and self.ops.go_sync is not None:
            await self.ops.go_sync(self)
        granted = await self.table.module.lock(self.gl_type, self.number, self.state, wanted)
        old, self.state = self.state, granted
        if old != LM_ST_UNLOCKED and self.ops.go_inval is not None and granted != old:
            await self.ops.go_inval(self)
        log.debug("glock %s: %s -> %s", self, STATE_NAMES[old], STATE_NAMES[granted])

    async def demote(self, target: int = LM_ST_UNLOCKED) -> None:
        """Give the lock up (or down) once no holder uses it: what a blocking callback
        from another node triggers. Sync before, invalidate after."""
        while self.holders:
            await self._changed.wait()
        if self.state == target:
            return
        if self.state == LM_ST_EXCLUSIVE and self.ops.go_sync is not None:
            await self.ops.go_sync(self)
        if target == LM_ST_UNLOCKED:
            await self.table.module.unlock(self.gl_type, self.number)
        else:
            await self.table.module.lock(self.gl_type, self.number, self.state, target)
        old, self.state = self.state, target
        if self.ops.go_inval is not None:
            await self.ops.go_inval(self)
        log.debug("glock %s: demoted from %s", self, STATE_NAMES[old])
        self._wake()


class GlockTable:
    """Every glock of one mount, created on first use, keyed by (type, number)."""

    def __init__(self, module: LockModule, ops: dict[int, GlockOps]) -> None:
        self.module = module
        self.ops = ops
        self.glocks: dict[tuple[int, int], Glock] = {}
        module.set_blocking_callback(self.blocking_callback)
        self._pending_demotes: list[tuple[int, int, int]] = []
        self._demote_wanted = trio.Event()

    def get(self, gl_type: int, number: int) -> Glock:
        key = (gl_type, number)
        glock = self.glocks.get(key)
        if glock is None:
            ops = self.ops.get(gl_type) or GlockOps(f"type{gl_type}")
            glock = Glock(gl_type, number, ops, self)
            self.glocks[key] = glock
        return glock

    @asynccontextmanager
    async def hold(self, gl_type: int, number: int, state: int) -> AsyncIterator[Holder]:
        """`async with table.hold(LM_TYPE_INODE, ino, LM_ST_EXCLUSIVE):` ..."""
        glock = self.get(gl_type, number)
        holder = await glock.acquire(state)
        try:
            yield holder
        finally:
            glock.release(holder)

    def blocking_callback(self, gl_type: int, number: int, wanted: int) -> None:
        """Queued: the demotion itself runs in `run_demotes`, never inside the module."""
        self._pending_demotes.append((gl_type, number, wanted))
        self._demote_wanted.set()

    async def wait_for_demotes(self) -> None:
        """Return once a blocking callback has queued a demotion."""
        while not self._pending_demotes:
            self._demote_wanted = trio.Event()
            await self._demote_wanted.wait()

    async def run_demotes(self) -> None:
        """Serve demotion requests queued by the lock module."""
        while self._pending_demotes:
            gl_type, number, wanted = self._pending_demotes.pop(0)
            target = LM_ST_SHARED if wanted == LM_ST_SHARED else LM_ST_UNLOCKED
            await self.get(gl_type, number).demote(target)

    def forget(self, gl_type: int, number: int) -> None:
        """Drop an idle glock from the table (the inode is gone or evicted)."""
        glock = self.glocks.get((gl_type, number))
        if glock is not None and not glock.holders:
            del self.glocks[(gl_type, number)]

    async def aclose(self) -> None:
        """Unmount: sync and drop every lock, then close the module."""
        for glock in list(self.glocks.values()):
            if glock.state != LM_ST_UNLOCKED:
                await glock.demote(LM_ST_UNLOCKED)
        self.glocks.clear()
        await self.module.aclose()
