"""The per-resource grant engine: the exact DLM queue and grant rules, with no I/O.

One `Resource` is the master copy of one lock resource. Its methods take a request,
conversion, unlock or cancel, apply the rules of the DLM (three queues, in-place and
queued conversions, conversion deadlock, LVB transfer, blocking callbacks) and return
the resulting events (`Completion`, `Blocking`) instead of calling anyone. Keeping it
pure lets the same code run on a local master, on a remote master reached over TCP and
in a randomized test against a reference model.

Locks are identified by an opaque hashable key; the lockspace uses (owner node, lock id)
so keys are unique cluster-wide and survive remastering unchanged.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import NamedTuple

from gfspy.dlm.modes import (
    ECANCEL,
    EDEADLK,
    EUNLOCK,
    LVB_LEN,
    LVB_READ,
    LVB_WRITE,
    DLMError,
    Flag,
    Mode,
    SBFlag,
    compatible,
    lvb_operation,
    validate_convert,
    validate_request,
    validate_unlock,
)

log = logging.getLogger(__name__)

GRANTED = "granted"
CONVERT = "convert"
WAITING = "waiting"


# Plain ints on the hot path (enum member access costs more than the rule it feeds).
IV, NL, CR, CW, PR, PW, EX = -1, 0, 1, 2, 3, 4, 5
#: compatibility indexed [granted + 1][requested + 1]; IV (no mode) conflicts with nothing.
_OK = tuple(tuple(compatible(g, r) for r in range(-1, 6)) for g in range(-1, 6))


class Completion(NamedTuple):
    """Completion callback for one operation on lock `key`.

    `mode` is the lock's granted mode after the operation (IV once it is gone);
    `lvb`/`lvbseq` are set when the lock uses VALBLK.
    """

    key: Hashable
    status: int
    mode: int
    sbflags: int = 0
    lvb: bytes | None = None
    lvbseq: int = 0


class Blocking(NamedTuple):
    """Blocking callback: lock `key` is blocking a request for `mode`."""

    key: Hashable
    mode: int


Event = Completion | Blocking


class LockState:
    """The master copy of one lock."""

    __slots__ = (
        "key",
        "grmode",
        "rqmode",
        "flags",
        "wants_bast",
        "highbast",
        "lvb",
        "lvbseq",
        "sbflags",
        "queue",
    )

    def __init__(
        self, key: Hashable, grmode: int = IV, rqmode: int = IV, flags: int = 0,
        wants_bast: bool = False, lvb: bytes | None = None, lvbseq: int = 0,
    ) -> None:  # fmt: skip
        self.key = key
        self.grmode = grmode
        self.rqmode = rqmode
        self.flags = flags
        self.wants_bast = wants_bast
        self.highbast = NL
        self.lvb = lvb
        self.lvbseq = lvbseq
        self.sbflags = 0
        self.queue = ""


@dataclass
class Resource:
    """Master state of one resource: queues, LVB and its sequence number."""

    name: bytes
    granted: list[LockState] = field(default_factory=list)
    converting: list[LockState] = field(default_factory=list)
    waiting: list[LockState] = field(default_factory=list)
    locks: dict[Hashable, LockState] = field(default_factory=dict)
    lvb: bytes = bytes(LVB_LEN)
    lvbseq: int = 0
    lvb_invalid: bool = False
    #: Set by purge when a dead PW/EX holder used VALBLK; applied by recover_lvb.
    lvb_inval_pending: bool = False
    _events: list[Event] = field(default_factory=list, repr=False)
    _queues: dict[str, list[LockState]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._queues = {GRANTED: self.granted, CONVERT: self.converting, WAITING: self.waiting}

    # ------------------------------------------------------------------ public calls

    def request(
        self,
        key: Hashable,
        mode: int,
        flags: int = 0,
        lvb: bytes | None = None,
        wants_bast: bool = False,
    ) -> list[Event]:
        """A new lock request; returns the events it caused."""
        if key in self.locks:
            raise DLMError(errno.EEXIST, f"lock {key!r} already exists on {self.name!r}")
        validate_request(mode, flags, self.name, lvb is not None)
        lock = LockState(key, IV, mode, flags, wants_bast, lvb)
        self.locks[key] = lock
        self._do_request(lock)
        return self._take_events()

    def convert(
        self,
        key: Hashable,
        mode: int,
        flags: int = 0,
        lvb: bytes | None = None,
        wants_bast: bool | None = None,
    ) -> list[Event]:
        """Convert a granted lock to `mode` (a conversion may set a new bast handler)."""
        lock = self._find(key)
        if lock.queue != GRANTED:
            raise DLMError(errno.EBUSY, f"lock {key!r} is not granted (it is {lock.queue})")
        validate_convert(lock.grmode, mode, flags, lvb is not None or lock.lvb is not None)
        lock.rqmode = mode
        lock.flags = flags | Flag.CONVERT
        lock.sbflags = 0
        if wants_bast is not None:
            lock.wants_bast = wants_bast
        if lvb is not None:
            lock.lvb = lvb
        self._do_convert(lock)
        return self._take_events()

    def unlock(self, key: Hashable, flags: int = 0, lvb: bytes | None = None) -> list[Event]:
        """Unlock, cancel (flag CANCEL) or force-unlock (flag FORCEUNLOCK) a lock."""
        lock = self._find(key)
        validate_unlock(flags)
        if flags & Flag.CANCEL:
            self._do_cancel(lock)
            return self._take_events()
        if not flags & Flag.FORCEUNLOCK and lock.queue != GRANTED:
            raise DLMError(errno.EBUSY, f"lock {key!r} has an operation in progress")
        if lvb is not None:
            lock.lvb = lvb
        lock.flags |= flags
        self._remove(lock)
        self._set_lvb_unlock(lock)
        self._events.append(Completion(key, EUNLOCK, IV))
        self._grant_pending()
        return self._take_events()

    def cancel(self, key: Hashable) -> list[Event]:
        """Withdraw a queued request or conversion; a no-op (no events) when granted."""
        return self.unlock(key, Flag.CANCEL)

    # ------------------------------------------------------------------ recovery hooks

    def purge(self, is_dead: Callable[[Hashable], bool]) -> int:
        """Drop the locks of failed owners; returns how many went.

        A dead PW/EX holder that used VALBLK may have changed the protected data without
        writing the LVB, so the LVB is marked for invalidation.
        """
        dead = [lock for lock in self.locks.values() if is_dead(lock.key)]
        for lock in dead:
            if lock.flags & Flag.VALBLK and lock.grmode >= PW:
                self.lvb_inval_pending = True
            self._remove(lock)
        return len(dead)

    def add_recovered(
        self,
        key: Hashable,
        grmode: int,
        rqmode: int,
        flags: int,
        wants_bast: bool,
        lvb: bytes | None,
        lvbseq: int,
    ) -> bool:
        """Rebuild a surviving owner's lock on a new master. Idempotent on `key`.

        A lock with a granted mode is rebuilt granted; a lock that was only waiting is
        rebuilt on the wait queue. Queue order after recovery is arbitrary anyway.
        """
        if key in self.locks:
            return False
        lock = LockState(key, grmode, rqmode, flags, wants_bast, lvb, lvbseq)
        self.locks[key] = lock
        if grmode == IV:
            self._enqueue(lock, WAITING)
        elif rqmode != IV:
            self._enqueue(lock, CONVERT)
        else:
            self._enqueue(lock, GRANTED)
        return True

    def recover_lvb(self, new_master: bool) -> None:
        """Recompute the LVB after recovery (before the grant pass, so grants report it).

        On a new master the value comes from a surviving lock stronger than CR (still
        valid), else from the NL/CR copy with the highest sequence number (then invalid);
        with no copy at all it is zeros marked invalid.
        """
        if new_master:
            holders = [lk for lk in self.granted + self.converting if lk.flags & Flag.VALBLK]
            if holders:
                big = next((lk for lk in holders if lk.grmode > CR), None)
                if big is not None:
                    source = big
                else:
                    source = max(holders, key=lambda lk: lk.lvbseq)
                    self.lvb_invalid = True
                self.lvb = source.lvb if source.lvb is not None else bytes(LVB_LEN)
                self.lvbseq = source.lvbseq
            else:
                # No survivor kept a copy: the dead master may have held a value written
                # under PW/EX that nobody can know, so the value is unknown, not zero.
                self.lvb = bytes(LVB_LEN)
                self.lvbseq = 0
                self.lvb_invalid = True
        if self.lvb_inval_pending:
            self.lvb_invalid = True
            self.lvb_inval_pending = False

    def grant_pending(self, recover: bool = False) -> list[Event]:
        """Re-run the grant pass; `recover` is the first pass after lockspace recovery."""
        self._grant_pending(recover)
        return self._take_events()

    @property
    def idle(self) -> bool:
        return not self.locks

    def dump(self) -> dict:
        """Queues and LVB state for the admin lock dump."""

        def row(lk: LockState) -> dict:
            return {
                "key": lk.key,
                "grmode": Mode(lk.grmode).name,
                "rqmode": Mode(lk.rqmode).name,
                "flags": int(lk.flags),
            }

        return {
            "granted": [row(lk) for lk in self.granted],
            "converting": [row(lk) for lk in self.converting],
            "waiting": [row(lk) for lk in self.waiting],
            "lvbseq": self.lvbseq,
            "lvb_invalid": self.lvb_invalid,
        }

    # ------------------------------------------------------------------ queues

    def _find(self, key: Hashable) -> LockState:
        lock = self.locks.get(key)
        if lock is None:
            raise DLMError(errno.ENOENT, f"no lock {key!r} on {self.name!r}")
        return lock

    def _take_events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def _enqueue(self, lock: LockState, which: str) -> None:
        lock.queue = which
        queue = self._queues[which]
        if which == GRANTED:
            # Kept ordered strongest first (stable among equal modes).
            for i, other in enumerate(queue):
                if other.grmode < lock.grmode:
                    queue.insert(i, lock)
                    return
            queue.append(lock)
        elif lock.flags & Flag.HEADQUE:
            queue.insert(0, lock)
        else:
            queue.append(lock)

    def _dequeue(self, lock: LockState) -> None:
        if lock.queue:
            self._queues[lock.queue].remove(lock)
            lock.queue = ""

    def _remove(self, lock: LockState) -> None:
        self._dequeue(lock)
        del self.locks[lock.key]

    # ------------------------------------------------------------------ grant rules

    def _can_be_granted_plain(self, lock: LockState, now: bool, recover: bool) -> bool:
        conv = lock.grmode != IV
        if lock.flags & Flag.EXPEDITE:
            return True
        column = lock.rqmode + 1
        for other in self.granted:
            if not _OK[other.grmode + 1][column] and other is not lock:
                return False
        for other in self.converting:
            if not _OK[other.grmode + 1][column] and other is not lock:
                return False
        if conv and recover:
            return True
        if now and conv:
            return not (lock.flags & Flag.QUECVT) or not self.converting
        if lock.flags & Flag.NOORDER:
            return True
        if conv:
            return bool(self.converting) and self.converting[0] is lock
        if now:
            return not self.converting and not self.waiting
        return not self.converting and bool(self.waiting) and self.waiting[0] is lock

    def _deadlocked(self, lock: LockState) -> bool:
        """Conversion deadlock: a lock ahead wants a mode our granted mode blocks, or one
        behind and we block each other."""
        ahead = True
        for other in self.converting:
            if other is lock:
                ahead = False
                continue
            blocks_other = not compatible(lock.grmode, other.rqmode)
            if ahead:
                if blocks_other:
                    return True
            elif blocks_other and not compatible(other.grmode, lock.rqmode):
                return True
        return False

    def _can_be_granted(
        self, lock: LockState, now: bool, recover: bool = False
    ) -> tuple[bool, bool]:
        """Returns (grantable, deadlocked), applying CONVDEADLK and ALTPR/ALTCW."""
        if self._can_be_granted_plain(lock, now, recover):
            return True, False
        conv = lock.grmode != IV
        if conv and not lock.flags & Flag.NOQUEUE and self._deadlocked(lock):
            if lock.flags & Flag.CONVDEADLK:
                lock.grmode = NL
                lock.sbflags |= SBFlag.DEMOTED
                if lock.queue == GRANTED:  # keep the granted queue ordered by mode
                    self._dequeue(lock)
                    self._enqueue(lock, GRANTED)
                return False, False
            return False, True
        alt = IV
        if lock.rqmode != PR and lock.flags & Flag.ALTPR:
            alt = PR
        elif lock.rqmode != CW and lock.flags & Flag.ALTCW:
            alt = CW
        if alt != IV:
            wanted = lock.rqmode
            lock.rqmode = alt
            if self._can_be_granted_plain(lock, now, False):
                lock.sbflags |= SBFlag.ALTMODE
                return True, False
            lock.rqmode = wanted
        return False, False

    def _grant(self, lock: LockState) -> None:
        self._set_lvb_lock(lock)
        self._dequeue(lock)
        lock.grmode = lock.rqmode
        lock.rqmode = IV
        lock.highbast = NL
        self._enqueue(lock, GRANTED)
        self._cast(lock, 0)

    def _cast(self, lock: LockState, status: int) -> None:
        use_lvb = bool(lock.flags & Flag.VALBLK)
        self._events.append(
            Completion(
                lock.key, status, lock.grmode, lock.sbflags,
                lock.lvb if use_lvb else None, lock.lvbseq if use_lvb else 0,
            )
        )  # fmt: skip
        lock.sbflags = 0

    def _set_lvb_lock(self, lock: LockState) -> None:
        if not lock.flags & (Flag.VALBLK | Flag.IVVALBLK) and not self.lvb_invalid:
            return  # the common case: this lock does not use the LVB at all
        op = lvb_operation(lock.grmode, lock.rqmode)
        if op == LVB_READ and lock.flags & Flag.VALBLK:
            lock.lvb = self.lvb
            lock.lvbseq = self.lvbseq
        elif op == LVB_WRITE:
            if lock.flags & Flag.IVVALBLK:
                self.lvb_invalid = True
            elif lock.flags & Flag.VALBLK and lock.lvb is not None:
                self._write_lvb(lock)
        if self.lvb_invalid:
            lock.sbflags |= SBFlag.VALNOTVALID

    def _set_lvb_unlock(self, lock: LockState) -> None:
        if lock.grmode < PW:
            return
        if lock.flags & Flag.IVVALBLK:
            self.lvb_invalid = True
        elif lock.flags & Flag.VALBLK and lock.lvb is not None:
            self._write_lvb(lock)

    def _write_lvb(self, lock: LockState) -> None:
        self.lvb = lock.lvb or bytes(LVB_LEN)
        self.lvbseq += 1
        lock.lvbseq = self.lvbseq
        self.lvb_invalid = False

    def _send_basts(self, lock: LockState, include_converting: bool) -> None:
        """Blocking callbacks for a request that just queued (or failed with NOQUEUEBAST)."""
        holders = self.granted + self.converting if include_converting else self.granted
        for holder in holders:
            if holder is lock or not holder.wants_bast:
                continue
            if self._bast_needed(holder, lock.rqmode, lock.rqmode == CW):
                self._events.append(Blocking(holder.key, lock.rqmode))
                holder.highbast = lock.rqmode

    @staticmethod
    def _bast_needed(holder: LockState, mode: int, cw_blocked: bool) -> bool:
        # PR and CW are unordered: a PR holder blocking a CW (or CW blocking PR) is
        # basted unless it was already basted for EX.
        if (holder.grmode == PR and cw_blocked) or (holder.grmode == CW and mode == PR):
            return holder.highbast < EX
        return holder.highbast < mode and not compatible(holder.grmode, mode)

    def _do_request(self, lock: LockState) -> None:
        grantable, _ = self._can_be_granted(lock, now=True)
        if grantable:
            self._grant(lock)
        elif not lock.flags & Flag.NOQUEUE:
            self._enqueue(lock, WAITING)
            self._send_basts(lock, include_converting=False)
        else:
            self._cast(lock, -errno.EAGAIN)
            del self.locks[lock.key]
            if lock.flags & Flag.NOQUEUEBAST:
                self._send_basts(lock, include_converting=True)

    def _do_convert(self, lock: LockState) -> None:
        grantable, deadlocked = self._can_be_granted(lock, now=True)
        if not grantable and deadlocked and not lock.flags & Flag.NODLCKWT:
            lock.rqmode = IV
            self._cast(lock, EDEADLK)
            return
        if not grantable and lock.sbflags & SBFlag.DEMOTED:
            # CONVDEADLK dropped us to NL: that may unblock other conversions first.
            self._grant_pending_convert(recover=False)
            grantable = self._can_be_granted_plain(lock, now=True, recover=False)
        if grantable:
            self._grant(lock)
            self._grant_pending()
        elif not lock.flags & Flag.NOQUEUE:
            self._dequeue(lock)
            self._enqueue(lock, CONVERT)
            self._send_basts(lock, include_converting=False)
        else:
            if lock.flags & Flag.NOQUEUEBAST:
                self._send_basts(lock, include_converting=True)
            lock.rqmode = IV
            self._cast(lock, -errno.EAGAIN)

    def _do_cancel(self, lock: LockState) -> None:
        if lock.queue == CONVERT:
            self._dequeue(lock)
            lock.rqmode = IV
            self._enqueue(lock, GRANTED)
            self._cast(lock, ECANCEL)
        elif lock.queue == WAITING:
            self._remove(lock)
            self._cast(lock, ECANCEL)
        else:
            return  # already granted: nothing to cancel, no callback
        self._grant_pending()

    def _grant_pending_convert(self, recover: bool) -> tuple[int, bool]:
        """Walk the convert queue, restarting after every grant; returns (high, cw)."""
        quit_after_demote = False
        while True:
            high, cw, restart, demote_restart = IV, False, False, False
            for lock in list(self.converting):
                demoted = bool(lock.sbflags & SBFlag.DEMOTED)
                grantable, deadlocked = self._can_be_granted(lock, now=False, recover=recover)
                if grantable:
                    self._grant(lock)
                    restart = True
                    break
                if not demoted and lock.sbflags & SBFlag.DEMOTED:
                    demote_restart = True
                    continue
                if deadlocked:
                    if lock.flags & Flag.NODLCKWT and lock.highbast < lock.rqmode:
                        self._events.append(Blocking(lock.key, lock.rqmode))
                        lock.highbast = lock.rqmode
                    else:
                        log.debug("resource %r: lock %r stays deadlocked", self.name, lock.key)
                    continue
                high = max(high, lock.rqmode)
                cw = cw or lock.rqmode == CW
            if restart:
                continue
            if demote_restart and not quit_after_demote:
                quit_after_demote = True
                continue
            return high, cw

    def _grant_pending(self, recover: bool = False) -> None:
        high, cw = self._grant_pending_convert(recover)
        for lock in list(self.waiting):
            grantable, _ = self._can_be_granted(lock, now=False)
            if grantable:
                self._grant(lock)
            else:
                high = max(high, lock.rqmode)
                cw = cw or lock.rqmode == CW
        if high == IV:
            return
        for holder in self.granted:
            if not holder.wants_bast or not self._bast_needed_high(holder, high, cw):
                continue
            mode = CW if cw and high == PR and holder.grmode == PR else high
            self._events.append(Blocking(holder.key, mode))
            holder.highbast = high

    @staticmethod
    def _bast_needed_high(holder: LockState, high: int, cw: bool) -> bool:
        if holder.grmode == PR and cw:
            return holder.highbast < EX
        return holder.highbast < high and not compatible(holder.grmode, high)
