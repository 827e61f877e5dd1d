"""The node's lock agent for one lockspace: local API, mastering, remote lock traffic.

A lock lives in up to two copies: the owner's `LockHandle` (process copy) here, and the
master copy inside the master node's `Resource` (engine.py). When this node masters the
resource, calls go straight to the engine (no network); otherwise REQUEST / CONVERT /
UNLOCK / CANCEL go to the master, which answers with CAST (completion) and BAST
(blocking) messages. The master of a resource is found by asking its directory node
(LOOKUP); the first node to ask becomes master.

Membership is driven from outside (gfspy.cluster): `stop()` when a change begins, then
`start(view)` once the new view is quorate and removed nodes are fenced. While stopped,
local calls and incoming lock traffic are queued and callbacks are held; `start` runs
recovery (recovery.py) and then replays all of it.
"""

from __future__ import annotations

import collections
import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from gfspy.cluster.view import View
from gfspy.dlm.directory import Directory, directory_node
from gfspy.dlm.engine import Blocking, Completion, Event, Resource
from gfspy.dlm.messages import (
    DIRECTORY_TYPES,
    RECOVERY_TYPES,
    Message,
    MsgType,
    encode_message,
)
from gfspy.dlm.modes import (
    ECANCEL,
    EUNLOCK,
    DLMError,
    Flag,
    Mode,
    check_lvb,
    compatible,
    status_name,
    validate_convert,
    validate_request,
    validate_unlock,
)
from gfspy.dlm.transport import Transport

log = logging.getLogger(__name__)

BastCallback = Callable[["LockHandle", int], None]
AstCallback = Callable[["LockHandle"], None]

REQUEST, CONVERT, UNLOCK, CANCEL = "request", "convert", "unlock", "cancel"


class LockHandle:
    """The owner's copy of one lock, returned by `Lockspace.lock`/`request`.

    `mode` is the granted mode as far as this node knows (IV before the first grant),
    `status`/`sbflags`/`lvb`/`lvbseq` come from the last completion.
    """

    __slots__ = (
        "ls", "lkid", "name", "bast", "ast", "mode", "flags", "lvb", "lvbseq", "sbflags",
        "status", "op", "op_mode", "op_flags", "unlocking", "unlock_flags", "cancel_pending",
        "gone", "held", "_begun", "_delivered", "_event",
    )  # fmt: skip

    def __init__(
        self,
        ls: Lockspace,
        lkid: int,
        name: bytes,
        bast: BastCallback | None,
        ast: AstCallback | None,
    ):
        self.ls = ls
        self.lkid = lkid
        self.name = name
        self.bast = bast
        self.ast = ast
        self.mode: int = Mode.IV
        self.flags: int = 0
        self.lvb: bytes | None = None
        self.lvbseq = 0
        self.sbflags = 0
        self.status: int | None = None
        #: Outstanding request/convert and its arguments (kept for a resend after recovery).
        self.op: str | None = None
        self.op_mode: int = Mode.IV
        self.op_flags: int = 0
        self.unlocking = False  # an unlock/force-unlock is outstanding
        self.unlock_flags = 0
        self.cancel_pending = False
        self.gone = False
        self.held: list[tuple] = []  # deliveries held back (grants frozen or order)
        #: Operations begun / completions delivered; `wait` compares them. The trio
        #: Event is only made when someone actually has to wait (the local-master fast
        #: path completes before the caller awaits).
        self._begun = 1
        self._delivered = 0
        self._event: trio.Event | None = None

    @property
    def delivered(self) -> bool:
        """True when the latest operation's completion has been delivered."""
        return self._delivered >= self._begun

    async def wait(self) -> int:
        """Wait for the completion of the latest operation; returns its status."""
        target = self._begun
        while self._delivered < target:
            if self._event is None:
                self._event = trio.Event()
            await self._event.wait()
        assert self.status is not None
        return self.status

    def __repr__(self) -> str:
        return f"<lock {self.ls.node_id}:{self.lkid} {self.name!r} {Mode(self.mode).name} op={self.op}>"


def _begin_op(handle: LockHandle) -> None:
    handle._begun += 1


@dataclass
class OwnerRsb:
    """What this node knows about a resource it uses: its master and pending work."""

    name: bytes
    master: int = 0  # 0 = unknown
    lookup_pending: bool = False
    lkids: set[int] = field(default_factory=set)
    #: (handle, action) waiting for the master to be known.
    waiting: list[tuple[LockHandle, str]] = field(default_factory=list)


class Lockspace:
    """One lockspace on one node. Create, then `await start(view)`; see module doc."""

    def __init__(self, name: bytes | str, transport: Transport) -> None:
        self.name = name.encode() if isinstance(name, str) else name
        self.transport = transport
        self.node_id = transport.node_id
        self.incarnation = transport.incarnation
        self.view: View | None = None
        self.epoch = 0
        self.members: tuple[int, ...] = ()
        self.running = False
        self.recover_seq = 0
        self.generation = 0
        #: Slot of every member (1, 2, ...), kept while a node stays a member; set by
        #: each completed recovery. GFS2 mounts journal `slot - 1`.
        self.slots: dict[int, int] = {}
        self.slot = 0
        self.handles: dict[int, LockHandle] = {}
        self.rsbs: dict[bytes, OwnerRsb] = {}
        self.masters: dict[bytes, Resource] = {}
        self.directory = Directory()
        self._next_lkid = 1
        self._saved: list[Message] = []
        self._deferred: list[tuple[LockHandle, str]] = []
        self._callbacks: collections.deque[tuple[Callable[..., Any], tuple]] = collections.deque()
        self._in_callbacks = False
        self.grants_blocked = False
        #: When set, every stop() blocks grants until the filesystem calls unblock_grants
        #: (GFS2's BLOCK_LOCKS: nobody uses a dead node's locks before its journal is
        #: replayed). Requests with Flag.NOEXP are exempt.
        self.block_grants_on_recovery = False
        self._held_handles: list[LockHandle] = []
        #: Optional filesystem hooks: recover_prep(), recover_slot(node_id), recover_done(ls).
        self.on_recover_prep: Callable[[], None] | None = None
        self.on_recover_slot: Callable[[int], None] | None = None
        self.on_recover_done: Callable[[Lockspace], None] | None = None
        from gfspy.dlm.recovery import Recovery  # recovery drives this object

        self.recovery = Recovery(self)
        transport.register(self.name, self._on_message)

    # ================================================================== public API

    def request(
        self,
        name: bytes | str,
        mode: int,
        flags: int = 0,
        lvb: bytes | None = None,
        bast: BastCallback | None = None,
        ast: AstCallback | None = None,
    ) -> LockHandle:
        """Queue a new lock request; the result arrives as a completion (see `wait`)."""
        name = name.encode() if isinstance(name, str) else bytes(name)
        validate_request(mode, flags, name, lvb is not None)
        handle = LockHandle(self, self._next_lkid, name, bast, ast)
        self._next_lkid += 1
        handle.flags = flags
        handle.lvb = check_lvb(lvb)
        handle.op, handle.op_mode, handle.op_flags = REQUEST, mode, flags
        self.handles[handle.lkid] = handle
        self._rsb(name).lkids.add(handle.lkid)
        self._submit(handle, REQUEST)
        return handle

    async def lock(
        self,
        name: bytes | str,
        mode: int,
        flags: int = 0,
        lvb: bytes | None = None,
        bast: BastCallback | None = None,
    ) -> LockHandle:
        """Request and wait for the grant; raises DLMError(EAGAIN/ECANCELED...) otherwise.

        If the caller is cancelled while waiting, nobody will ever own the lock: the
        request is cancelled, and should the grant win that race, it is unlocked.
        """
        handle = self.request(name, mode, flags, lvb, bast)
        try:
            status = await handle.wait()
        except trio.Cancelled:
            self._abandon(handle)
            raise
        self._raise_for(status, handle)
        return handle

    def _abandon(self, handle: LockHandle) -> None:
        def release_if_granted(h: LockHandle) -> None:
            if not h.gone and h.status == 0 and h.op is None and not h.unlocking:
                self.request_unlock(h)

        handle.ast = release_if_granted
        handle.bast = None
        if handle.gone:
            return
        if handle.op is None:  # granted already, the caller just never saw it
            release_if_granted(handle)
        else:
            self.cancel(handle)

    def request_convert(
        self, handle: LockHandle, mode: int, flags: int = 0, lvb: bytes | None = None
    ) -> None:
        """Queue a conversion of a granted lock (EBUSY if anything is outstanding)."""
        self._check_live(handle)
        if handle.op or handle.unlocking or handle.mode == Mode.IV:
            raise DLMError(errno.EBUSY, f"{handle!r}: operation in progress")
        validate_convert(handle.mode, mode, flags, lvb is not None or handle.lvb is not None)
        if lvb is not None:
            handle.lvb = check_lvb(lvb)
        handle.flags = flags
        handle.op, handle.op_mode, handle.op_flags = CONVERT, mode, flags | Flag.CONVERT
        _begin_op(handle)
        self._submit(handle, CONVERT)

    async def convert(
        self, handle: LockHandle, mode: int, flags: int = 0, lvb: bytes | None = None
    ) -> int:
        """Convert and wait; raises DLMError on EAGAIN/EDEADLK/cancel."""
        self.request_convert(handle, mode, flags, lvb)
        status = await handle.wait()
        self._raise_for(status, handle)
        return status

    def request_unlock(self, handle: LockHandle, flags: int = 0, lvb: bytes | None = None) -> None:
        """Queue an unlock (FORCEUNLOCK: whatever is in progress; CANCEL: see `cancel`)."""
        self._check_live(handle)
        validate_unlock(flags)
        if flags & Flag.CANCEL:
            self.cancel(handle)
            return
        if not flags & Flag.FORCEUNLOCK and (
            handle.op or handle.unlocking or handle.mode == Mode.IV
        ):
            raise DLMError(errno.EBUSY, f"{handle!r}: operation in progress")
        if handle.unlocking:
            raise DLMError(errno.EBUSY, f"{handle!r}: already unlocking")
        if lvb is not None:
            handle.lvb = check_lvb(lvb)
        handle.unlocking = True
        handle.unlock_flags = flags
        _begin_op(handle)
        if flags & Flag.FORCEUNLOCK and handle.op and self._withdraw_unsent(handle):
            if handle.op == REQUEST:  # no master has heard of this lock: done here
                self._complete(handle, EUNLOCK, Mode.IV, 0, None, 0)
                return
            handle.op = None  # an unsent conversion is simply dropped; the unlock goes on
        self._submit(handle, UNLOCK)

    async def unlock(self, handle: LockHandle, flags: int = 0, lvb: bytes | None = None) -> int:
        """Unlock and wait until the lock is gone; returns EUNLOCK."""
        self.request_unlock(handle, flags, lvb)
        return await handle.wait()

    def cancel(self, handle: LockHandle) -> bool:
        """Withdraw a queued request/conversion. Returns False (and does nothing, no
        callback) when there is nothing to cancel; otherwise the cancelled operation
        completes with ECANCEL, or normally if it was granted first."""
        self._check_live(handle)
        if handle.op is None or handle.cancel_pending:
            return False
        if self._withdraw_unsent(handle):
            self._complete(handle, ECANCEL, handle.mode, 0, None, 0)
            return True
        handle.cancel_pending = True
        self._submit(handle, CANCEL)
        return True

    def block_grants(self) -> None:
        """Hold back grant completions (except NOEXP requests) until unblock_grants."""
        self.grants_blocked = True

    def unblock_grants(self) -> None:
        """The filesystem has recovered the journals: deliver the held grants."""
        self.grants_blocked = False
        held, self._held_handles = self._held_handles, []
        for handle in held:
            pending, handle.held = handle.held, []
            for item in pending:
                self._callbacks.append(item)
        self._run_callbacks()

    async def stop(self) -> None:
        """A membership change begins: stop locking until `start(view)`."""
        self.running = False
        self.recover_seq += 1
        if self.block_grants_on_recovery:
            self.grants_blocked = True
        if self.on_recover_prep:
            self.on_recover_prep()
        self.recovery.wake()
        log.info(
            "lockspace %s node %d: stopped (recover_seq %d)",
            self.name.decode(errors="replace"),
            self.node_id,
            self.recover_seq,
        )
        await trio.lowlevel.checkpoint()

    async def start(self, view: View) -> bool:
        """Install `view` and recover; returns False if a newer stop() aborted it."""
        return await self.recovery.run(view)

    def close(self) -> None:
        """Leave: stop taking traffic for this lockspace (after the cluster's last view
        without us, or at unmount once every lock is released)."""
        self.running = False
        self.recover_seq += 1
        self.recovery.wake()
        self.transport.unregister(self.name)

    def dump(self) -> dict:
        """Resources, masters and queues on this node, for `gfspy` lock dumps."""
        resources = []
        for name, res in sorted(self.masters.items()):
            entry = {"name": name, "master": self.node_id, **res.dump()}
            entry["lvb"] = res.lvb
            resources.append(entry)
        locks = [
            {
                "lkid": h.lkid, "name": h.name, "mode": Mode(h.mode).name,
                "op": h.op, "master": self.rsbs[h.name].master if h.name in self.rsbs else 0,
            }
            for h in sorted(self.handles.values(), key=lambda h: h.lkid)
        ]  # fmt: skip
        return {
            "lockspace": self.name,
            "node": self.node_id,
            "epoch": self.epoch,
            "generation": self.generation,
            "slots": dict(self.slots),
            "running": self.running,
            "state": self.recovery.status(),
            "grants_blocked": self.grants_blocked,
            "members": list(self.members),
            "mastered": resources,
            "directory": dict(sorted(self.directory.entries.items())),
            "locks": locks,
        }

    # ================================================================== owner side

    @staticmethod
    def _raise_for(status: int, handle: LockHandle) -> None:
        if status == 0:
            return
        err = errno.ECANCELED if status == ECANCEL else -status if status < 0 else errno.EIO
        raise DLMError(err, f"{handle!r}: {status_name(status)}")

    @staticmethod
    def _check_live(handle: LockHandle) -> None:
        if handle.gone:
            raise DLMError(errno.ENOENT, f"{handle!r} no longer exists")

    def _rsb(self, name: bytes) -> OwnerRsb:
        rsb = self.rsbs.get(name)
        if rsb is None:
            self.rsbs[name] = rsb = OwnerRsb(name)
        return rsb

    def _withdraw_unsent(self, handle: LockHandle) -> bool:
        """Take back a request/convert not yet sent to a master (deferred or awaiting lookup)."""
        for queue in (self._deferred, self._rsb(handle.name).waiting):
            for i, (h, action) in enumerate(queue):
                if h is handle and action in (REQUEST, CONVERT):
                    del queue[i]
                    return True
        return False

    def _submit(self, handle: LockHandle, action: str) -> None:
        if not self.running:
            self._deferred.append((handle, action))
            return
        rsb = self._rsb(handle.name)
        if rsb.master == 0:
            rsb.waiting.append((handle, action))
            if not rsb.lookup_pending:
                self._start_lookup(rsb)
            return
        self._send_op(rsb.master, handle, action)

    def _start_lookup(self, rsb: OwnerRsb) -> None:
        dir_node = directory_node(rsb.name, self.members)
        if dir_node == self.node_id:
            self._set_master(rsb, self.directory.lookup(rsb.name, self.node_id))
            return
        rsb.lookup_pending = True
        self._send(dir_node, MsgType.LOOKUP, rsb.name)

    def _set_master(self, rsb: OwnerRsb, master: int) -> None:
        rsb.master = master
        rsb.lookup_pending = False
        waiting, rsb.waiting = rsb.waiting, []
        for handle, action in waiting:
            self._send_op(master, handle, action)

    def _send_op(self, master: int, h: LockHandle, action: str) -> None:
        if master == self.node_id:
            self._master_apply(
                self.node_id,
                h.lkid,
                h.name,
                action,
                h.op_mode,
                h.unlock_flags if action == UNLOCK else h.op_flags,
                h.lvb,
                h.bast is not None,
            )
            return
        if action == REQUEST:
            self._send(
                master,
                MsgType.REQUEST,
                h.name,
                h.lkid,
                h.op_mode,
                h.op_flags,
                h.bast is not None,
                h.lvb,
            )
        elif action == CONVERT:
            self._send(
                master, MsgType.CONVERT, h.name, h.lkid, h.op_mode, h.op_flags,
                h.bast is not None, h.lvb,
            )  # fmt: skip
        elif action == UNLOCK:
            self._send(master, MsgType.UNLOCK, h.name, h.lkid, h.unlock_flags, h.lvb)
        else:
            self._send(master, MsgType.CANCEL, h.name, h.lkid)

    def _complete(
        self, h: LockHandle, status: int, mode: int, sbflags: int, lvb: bytes | None, lvbseq: int
    ) -> None:
        """Apply a completion to the owner copy, then deliver it (maybe held back)."""
        if h.gone:
            log.debug("completion %s for a lock already gone: %r", status_name(status), h)
            return
        if status == EUNLOCK:
            h.mode, h.gone = Mode.IV, True
        elif status == 0 or status == ECANCEL:
            h.mode = mode
            h.gone = mode == Mode.IV
        elif h.op == REQUEST:
            h.gone = True  # EAGAIN etc. on a new request: the lock is destroyed
        if lvb is not None:
            h.lvb, h.lvbseq = lvb, lvbseq
        h.sbflags, h.status = sbflags, status
        if status == EUNLOCK or h.gone:
            h.unlocking = False
            h.op = None
        elif h.op is not None:
            h.op = None
        h.cancel_pending = False
        if h.gone:
            self.handles.pop(h.lkid, None)
            rsb = self.rsbs.get(h.name)
            if rsb is not None:
                rsb.lkids.discard(h.lkid)
        freeze = self.grants_blocked and status == 0 and not h.flags & Flag.NOEXP
        self._deliver(h, (self._notify, (h,)), freeze)

    def _notify(self, h: LockHandle) -> None:
        h._delivered = h._begun if h.gone else h._delivered + 1
        event = h._event
        if event is not None:
            h._event = None
            event.set()
        if h.ast is not None:
            h.ast(h)

    def _on_bast(self, h: LockHandle, mode: int) -> None:
        if h.gone or h.bast is None:
            return
        self._deliver(h, (self._fire_bast, (h, mode)), False)

    def _fire_bast(self, h: LockHandle, mode: int) -> None:
        # A bast the holder no longer deserves (it converted down meanwhile) is stale.
        if h.gone or h.bast is None or h.mode == Mode.IV or compatible(h.mode, mode):
            return
        h.bast(h, mode)

    def _deliver(self, h: LockHandle, item: tuple, freeze: bool) -> None:
        if freeze or h.held:
            if not h.held:
                self._held_handles.append(h)
            h.held.append(item)
            return
        self._callbacks.append(item)
        self._run_callbacks()

    def _run_callbacks(self) -> None:
        """Run queued callbacks in order; callbacks may issue new lock calls."""
        if self._in_callbacks or not self.running:
            return
        self._in_callbacks = True
        try:
            while self._callbacks and self.running:
                fn, args = self._callbacks.popleft()
                try:
                    fn(*args)
                except Exception:
                    log.exception(
                        "lockspace %r node %d: lock callback failed", self.name, self.node_id
                    )
        finally:
            self._in_callbacks = False

    # ================================================================== master side

    def master_resource(self, name: bytes) -> Resource:
        res = self.masters.get(name)
        if res is None:
            self.masters[name] = res = Resource(name)
        return res

    def _master_apply(
        self, owner: int, lkid: int, name: bytes, action: str, mode: int, flags: int,
        lvb: bytes | None, wants_bast: bool,
    ) -> None:  # fmt: skip
        res = self.master_resource(name)
        key = (owner, lkid)
        try:
            if action == REQUEST:
                events = res.request(key, mode, flags & ~Flag.NOEXP, lvb, wants_bast)
            elif action == CONVERT:
                events = res.convert(
                    key, mode, flags & ~(Flag.CONVERT | Flag.NOEXP), lvb, wants_bast
                )
            elif action == UNLOCK:
                events = res.unlock(key, flags, lvb)
            else:
                events = res.cancel(key) if key in res.locks else []
        except DLMError as exc:
            log.warning("lockspace %r node %d: %s of %s on %r from node %d refused: %s",
                        self.name, self.node_id, action, lkid, name, owner, exc)  # fmt: skip
            lock = res.locks.get(key)
            events = [Completion(key, -exc.errno, lock.grmode if lock else Mode.IV)]
        self.dispatch(name, events)

    def dispatch(self, name: bytes, events: list[Event]) -> None:
        """Route engine events to local owners or, as CAST/BAST, to remote ones."""
        for ev in events:
            owner, lkid = ev.key  # type: ignore[misc]
            if owner == self.node_id:
                h = self.handles.get(lkid)
                if h is None:
                    continue
                if isinstance(ev, Completion):
                    self._complete(h, ev.status, ev.mode, ev.sbflags, ev.lvb, ev.lvbseq)
                else:
                    self._on_bast(h, ev.mode)
            elif isinstance(ev, Completion):
                self._send(
                    owner,
                    MsgType.CAST,
                    name,
                    lkid,
                    ev.status,
                    ev.mode,
                    int(ev.sbflags),
                    ev.lvb,
                    ev.lvbseq,
                )
            else:
                assert isinstance(ev, Blocking)
                self._send(owner, MsgType.BAST, name, lkid, ev.mode)

    # ================================================================== messages

    def _send(self, node: int, mtype: MsgType, *values: Any) -> None:
        payload = encode_message(
            mtype, self.name, self.node_id, self.incarnation, self.epoch, *values
        )
        self.transport.send(node, payload)

    def is_member(self, msg: Message) -> bool:
        member = self.view.member(msg.from_node) if self.view else None
        return member is not None and member.incarnation == msg.incarnation

    def _on_message(self, msg: Message) -> None:
        if msg.type in RECOVERY_TYPES:
            self.recovery.receive(msg)
            return
        if not self.is_member(msg):
            log.warning("lockspace %r node %d: dropped %s from non-member node %d (incarnation %d)",
                        self.name, self.node_id, msg.type.name, msg.from_node, msg.incarnation)  # fmt: skip
            return
        if not self.running:
            self._saved.append(msg)
            if msg.type is MsgType.REQUEST:
                # Make sure recovery reports us as master of this name (see recovery.py).
                self.master_resource(msg.name)
            return
        self.process(msg)

    def replay_saved(self) -> None:
        saved, self._saved = self._saved, []
        for msg in saved:
            if not self.is_member(msg):
                log.info("lockspace %r node %d: dropped saved %s from departed node %d",
                         self.name, self.node_id, msg.type.name, msg.from_node)  # fmt: skip
            elif msg.type in DIRECTORY_TYPES and msg.epoch < self.epoch:
                continue  # refers to the old directory; the sender redoes its lookup
            else:
                self.process(msg)

    def process(self, msg: Message) -> None:
        t = msg.type
        f = msg.fields
        if t is MsgType.REQUEST:
            self._master_apply(
                msg.from_node,
                f["lkid"],
                f["name"],
                REQUEST,
                f["mode"],
                f["flags"],
                f["lvb"],
                f["wants_bast"],
            )
        elif t is MsgType.CONVERT:
            self._master_apply(
                msg.from_node,
                f["lkid"],
                f["name"],
                CONVERT,
                f["mode"],
                f["flags"],
                f["lvb"],
                f["wants_bast"],
            )
        elif t is MsgType.UNLOCK:
            self._master_apply(
                msg.from_node, f["lkid"], f["name"], UNLOCK, 0, f["flags"], f["lvb"], False
            )
        elif t is MsgType.CANCEL:
            self._master_apply(msg.from_node, f["lkid"], f["name"], CANCEL, 0, 0, None, False)
        elif t is MsgType.CAST:
            h = self.handles.get(f["lkid"])
            if h is not None and h.name == f["name"]:
                self._complete(h, f["status"], f["mode"], f["sbflags"], f["lvb"], f["lvbseq"])
        elif t is MsgType.BAST:
            h = self.handles.get(f["lkid"])
            if h is not None and h.name == f["name"]:
                self._on_bast(h, f["mode"])
        elif t in DIRECTORY_TYPES and msg.epoch != self.epoch:
            # An answer from another view's directory; the lookup is redone if needed.
            log.info("lockspace %r node %d: dropped %s of epoch %d from node %d",
                     self.name, self.node_id, t.name, msg.epoch, msg.from_node)  # fmt: skip
        elif t is MsgType.LOOKUP:
            name = f["name"]
            if directory_node(name, self.members) != self.node_id:
                self._send(msg.from_node, MsgType.LOOKUP_REPLY, name, 0)
            else:
                self._send(
                    msg.from_node,
                    MsgType.LOOKUP_REPLY,
                    name,
                    self.directory.lookup(name, msg.from_node),
                )
        elif t is MsgType.LOOKUP_REPLY:
            rsb = self.rsbs.get(f["name"])
            if rsb is None or not rsb.lookup_pending:
                return
            if f["master"] == 0 or f["master"] not in self.members:
                rsb.lookup_pending = False
                self._start_lookup(rsb)
            else:
                self._set_master(rsb, f["master"])

    def resume(self) -> None:
        """After recovery: replay saved traffic, resend held-up operations, run callbacks."""
        self.running = True
        self.replay_saved()
        deferred, self._deferred = self._deferred, []
        for rsb in list(self.rsbs.values()):
            if rsb.waiting and rsb.master == 0 and not rsb.lookup_pending:
                self._start_lookup(rsb)
            elif rsb.waiting and rsb.master:
                self._set_master(rsb, rsb.master)
        for handle, action in deferred:
            self._submit(handle, action)
        self._run_callbacks()
