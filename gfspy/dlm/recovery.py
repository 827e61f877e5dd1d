"""Lockspace recovery after a membership change, run inside `Lockspace.start(view)`.

The cluster layer calls `stop()` on every node, then `start(view)` once the view is
quorate and every removed node is fenced. Every node then runs the same steps:

1. install the members; barrier NODES (every member has stopped and started this view);
2. rebuild the directory: each node sends every directory node the names it masters;
   barrier DIR;
3. fix operations in flight to departed masters (requests and conversions are resent
   afterwards, unlocks and cancels complete at once);
4. purge departed owners' locks from resources we master (a dead PW/EX holder that used
   VALBLK invalidates the LVB);
5. remaster resources whose master departed: ask the (new) directory node, first asker
   wins; send our locks to the new master (RLOCKS); barrier LOCKS;
6. recover LVBs on new masters; barrier DONE; resume: grant pass on touched resources,
   replay saved traffic, resend, deliver callbacks.

Links are ordered per peer, so a barrier message from a node also proves that every
message it sent earlier (RLOCKS, DIR_NAMES, pre-stop lock traffic) has arrived. A newer
`stop()` aborts the pass at its next wait; the next `start` redoes it from scratch, and
every step is idempotent (locks are keyed by (owner node, lock id)).
"""

from __future__ import annotations

import errno
import itertools
import logging
from collections import defaultdict
from collections.abc import Callable

import trio

from gfspy.cluster.view import View
from gfspy.dlm.directory import directory_node
from gfspy.dlm.lockspace import CANCEL, UNLOCK, Lockspace
from gfspy.dlm.messages import Message, MsgType
from gfspy.dlm.modes import ECANCEL, EUNLOCK, DLMError, Flag, Mode

log = logging.getLogger(__name__)

NODES, DIR, LOCKS, DONE = 1, 2, 3, 4
_STEP_NAMES = {NODES: "NODES", DIR: "DIR", LOCKS: "LOCKS", DONE: "DONE"}
MAX_BUFFERED = 100_000


class RecoveryAborted(Exception):
    """A newer stop() arrived; this pass must not enable locking."""


class Recovery:
    """Recovery state and steps of one lockspace."""

    def __init__(self, ls: Lockspace) -> None:
        self.ls = ls
        self._future: dict[int, list[Message]] = defaultdict(list)
        self._buffered = 0
        self._barriers: dict[tuple[int, int], set[int]] = defaultdict(set)
        self._barrier_data: dict[tuple[int, int, int], list[int]] = {}
        self._dir_names: dict[int, dict[int, list[bytes]]] = defaultdict(dict)
        self._rlookup: dict[tuple[int, bytes], int] = {}
        self._changed = trio.Event()
        #: Work of passes that did not complete is carried into the next pass, which must
        #: finish it: resources we became master of, resources purge touched, and names
        #: remastered (the new master may have dropped our RLOCKS as stale: redo them).
        self.new_master: set[bytes] = set()
        self.touched: set[bytes] = set()
        self.remastered: set[bytes] = set()
        #: The last view whose recovery completed; departures are measured against it.
        self.completed_view: View | None = None
        self.last_duration = 0.0
        self.waiting_for: tuple[str, Callable[[], object]] | None = None
        self.passes = 0

    # ------------------------------------------------------------------ messages

    def wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def receive(self, msg: Message) -> None:
        ls = self.ls
        if msg.epoch > ls.epoch:
            if self._buffered >= MAX_BUFFERED:
                log.warning("lockspace %r node %d: recovery buffer full, dropped %s from node %d",
                            ls.name, ls.node_id, msg.type.name, msg.from_node)  # fmt: skip
                return
            self._future[msg.epoch].append(msg)
            self._buffered += 1
            return
        if msg.epoch < ls.epoch:
            log.debug("lockspace %r node %d: stale %s (epoch %d) from node %d dropped",
                      ls.name, ls.node_id, msg.type.name, msg.epoch, msg.from_node)  # fmt: skip
            return
        if not ls.is_member(msg):
            log.warning("lockspace %r node %d: dropped %s from non-member node %d (incarnation %d)",
                        ls.name, ls.node_id, msg.type.name, msg.from_node, msg.incarnation)  # fmt: skip
            return
        self._handle(msg)
        self.wake()

    def _handle(self, msg: Message) -> None:
        ls = self.ls
        f = msg.fields
        if msg.type is MsgType.BARRIER:
            self._barriers[(msg.epoch, f["step"])].add(msg.from_node)
            self._barrier_data[(msg.epoch, f["step"], msg.from_node)] = f["data"]
        elif msg.type is MsgType.DIR_NAMES:
            self._dir_names[msg.epoch][msg.from_node] = f["names"]
        elif msg.type is MsgType.RLOOKUP:
            master = ls.directory.lookup(f["name"], msg.from_node)
            ls._send(msg.from_node, MsgType.RLOOKUP_REPLY, f["name"], master)
        elif msg.type is MsgType.RLOOKUP_REPLY:
            self._rlookup[(msg.epoch, f["name"])] = f["master"]
        elif msg.type is MsgType.RLOCKS:
            self._rebuild_remote(msg.from_node, f["name"], f["locks"])

    def _rebuild_remote(self, owner: int, name: bytes, rows: list) -> None:
        ls = self.ls
        if name not in ls.masters:
            self.new_master.add(name)
        res = ls.master_resource(name)
        for lkid, grmode, rqmode, flags, wants_bast, lvb, lvbseq in rows:
            res.add_recovered((owner, lkid), grmode, rqmode, flags, wants_bast, lvb, lvbseq)

    async def _wait(
        self, seq: int, ready: Callable[[], bool], what: str, missing: Callable[[], object]
    ) -> None:
        """Wait for recovery messages; `what`/`missing` say what we wait for, for status."""
        self.waiting_for = (what, missing)
        try:
            while not ready():
                if self.ls.recover_seq != seq:
                    raise RecoveryAborted
                await self._changed.wait()
            if self.ls.recover_seq != seq:
                raise RecoveryAborted
        finally:
            self.waiting_for = None

    def status(self) -> str:
        """One line for operators: what recovery is waiting for, and from whom."""
        if self.ls.running:
            return "running"
        if self.waiting_for is None:
            return f"stopped (epoch {self.ls.epoch})"
        what, missing = self.waiting_for
        return f"recovering epoch {self.ls.epoch}: waiting for {what} from {missing()}"

    async def _barrier(self, seq: int, step: int, data: list[int] | None = None) -> None:
        ls = self.ls
        others = {m for m in ls.members if m != ls.node_id}
        self._barrier_data[(ls.epoch, step, ls.node_id)] = data or []
        for node in others:
            ls._send(node, MsgType.BARRIER, step, data or [])
        got = self._barriers[(ls.epoch, step)]
        await self._wait(
            seq, lambda: got >= others, f"barrier {_STEP_NAMES[step]}",
            lambda: f"nodes {sorted(others - got)}",
        )  # fmt: skip

    # ------------------------------------------------------------------ the pass

    async def run(self, view: View) -> bool:
        ls = self.ls
        if ls.running:
            await ls.stop()
        if ls.view is not None and view.epoch <= ls.epoch:
            raise DLMError(errno.EINVAL, f"view {view.epoch} is not newer than {ls.epoch}")
        if ls.view is None and view.member(ls.node_id) is None:
            raise DLMError(errno.EINVAL, f"node {ls.node_id} is not in view {view.epoch}")
        seq = ls.recover_seq
        started = trio.current_time()
        gone = self._install(view)
        try:
            # Each member reports its slot; the lowest member hands out the slot map
            # with its DIR barrier (GFS2 uses slot - 1 as the node's journal id).
            await self._barrier(seq, NODES, [ls.slot])
            await self._rebuild_directory(seq)
            slot_map = self._assign_slots() if ls.node_id == view.low_node else None
            await self._barrier(seq, DIR, slot_map)
            slots = self._barrier_data[(view.epoch, DIR, view.low_node)]
            remaster = self._fix_owner_side(gone)
            self.touched |= self._purge(gone)
            await self._remaster(seq, remaster)
            await self._barrier(seq, LOCKS)
            for name in self.new_master | self.touched:
                ls.masters[name].recover_lvb(new_master=name in self.new_master)
            await self._barrier(seq, DONE)
        except RecoveryAborted:
            log.info("lockspace %r node %d: recovery of epoch %d aborted by a newer change",
                     ls.name, ls.node_id, view.epoch)  # fmt: skip
            return False
        regrant = self.new_master | self.touched
        self.new_master, self.touched, self.remastered = set(), set(), set()
        self.completed_view = view
        ls.generation = view.epoch
        ls.slots = dict(zip(slots[::2], slots[1::2], strict=True))
        ls.slot = ls.slots.get(ls.node_id, 0)
        ls.running = True
        for name in sorted(regrant):
            ls.dispatch(name, ls.masters[name].grant_pending(recover=True))
        ls.resume()
        self._forget_old(view.epoch)
        self.passes += 1
        self.last_duration = trio.current_time() - started
        log.info("lockspace %r node %d: recovery epoch %d done in %.1f ms (%d departed, %d regranted)",
                 ls.name, ls.node_id, view.epoch, self.last_duration * 1000, len(gone), len(regrant))  # fmt: skip
        if ls.on_recover_done:
            ls.on_recover_done(ls)
        return True

    def _assign_slots(self) -> list[int]:
        """Members keep their slot; newcomers get the lowest free ones, by node id."""
        ls = self.ls
        reported = {}
        for node in ls.members:
            data = self._barrier_data.get((ls.epoch, NODES, node)) or [0]
            reported[node] = data[0] if data[0] > 0 else 0
        taken: set[int] = set()
        slots = {}
        for node in ls.members:
            if reported[node] and reported[node] not in taken:
                slots[node] = reported[node]
                taken.add(reported[node])
        free = (n for n in itertools.count(1) if n not in taken)
        for node in ls.members:
            if node not in slots:
                slots[node] = next(free)
        return [v for node in ls.members for v in (node, slots[node])]

    def _install(self, view: View) -> set[int]:
        """Install the members; returns departed node ids (incl. restarted incarnations)."""
        ls = self.ls
        gone: set[int] = set()
        if self.completed_view is not None:
            for old in self.completed_view.members:
                new = view.member(old.node_id)
                if new is None or new.incarnation != old.incarnation:
                    gone.add(old.node_id)
        ls.view, ls.epoch, ls.members = view, view.epoch, view.member_ids
        for node in gone:
            ls.transport.forget(node)
        for member in view.members:
            ls.transport.set_peer(member.node_id, member.address, member.incarnation)
        for node in sorted(gone & set(view.removed) if view.removed else gone):
            if ls.on_recover_slot:
                ls.on_recover_slot(node)
        # Resources this node became master of in a pass that did not complete are
        # dropped: the owners rebuild them from scratch against this pass's directory
        # (two aborted passes could otherwise leave two masters of one name).
        for name in self.new_master:
            ls.masters.pop(name, None)
            self.touched.discard(name)
        self.new_master = set()
        for epoch in [e for e in self._future if e < view.epoch]:
            self._buffered -= len(self._future.pop(epoch))
        pending = self._future.pop(view.epoch, [])
        self._buffered -= len(pending)
        for msg in pending:
            self.receive(msg)
        return gone

    async def _rebuild_directory(self, seq: int) -> None:
        ls = self.ls
        others = {m for m in ls.members if m != ls.node_id}
        names_for: dict[int, list[bytes]] = defaultdict(list)
        for name in ls.masters:
            names_for[directory_node(name, ls.members)].append(name)
        for node in others:
            ls._send(node, MsgType.DIR_NAMES, names_for.get(node, []))
        received = self._dir_names[ls.epoch]
        await self._wait(
            seq, lambda: set(received) >= others, "directory names",
            lambda: f"nodes {sorted(others - set(received))}",
        )  # fmt: skip
        ls.directory.clear()
        for name in names_for.get(ls.node_id, []):
            ls.directory.add(name, ls.node_id)
        for node, names in received.items():
            for name in names:
                ls.directory.add(name, node)

    def _fix_owner_side(self, gone: set[int]) -> list:
        """Owner copies whose master departed; returns the rsbs that need a new master.

        Also forgets cached masters that may not know the resource: the directory was
        just rebuilt from what masters hold, so a master we never sent anything to may
        have no entry any more, and a fresh lookup must decide.
        """
        ls = self.ls
        alive = set(ls.members)
        unsent = {(id(h), action) for h, action in ls._deferred}
        for rsb in ls.rsbs.values():
            unsent.update((id(h), action) for h, action in rsb.waiting)

        def sent(h, action: str | None) -> bool:
            return action is not None and (id(h), action) not in unsent

        remaster = []
        for name, rsb in list(ls.rsbs.items()):
            rsb.lookup_pending = False  # lookups are redone against the new directory
            handles = [ls.handles[lkid] for lkid in sorted(rsb.lkids)]
            redo = name in self.remastered and rsb.master != 0
            if not redo and (rsb.master == 0 or (rsb.master in alive and rsb.master not in gone)):
                if rsb.master not in (0, ls.node_id) and not any(
                    h.mode != Mode.IV or sent(h, h.op) or (h.unlocking and sent(h, UNLOCK))
                    for h in handles
                ):
                    rsb.master = 0
                if not rsb.lkids and not rsb.waiting and rsb.master != ls.node_id:
                    del ls.rsbs[name]  # a cached master we no longer need
                continue
            resend = []
            for h in handles:
                if h.unlocking and sent(h, UNLOCK):
                    ls._complete(h, EUNLOCK, Mode.IV, 0, None, 0)
                elif sent(h, h.op) and h.cancel_pending:
                    rsb.waiting = [(x, a) for x, a in rsb.waiting if x is not h or a != CANCEL]
                    ls._complete(h, ECANCEL, h.mode, 0, None, 0)
                elif sent(h, h.op):
                    resend.append((h, h.op))  # resend once a master is known
            rsb.waiting[:0] = resend
            rsb.master = 0
            if rsb.lkids:
                # Even with only requests still to be resent, rebuild the resource at its
                # new master first: it then knows the old master's LVB was lost.
                remaster.append(rsb)
        return remaster

    def _purge(self, gone: set[int]) -> set[bytes]:
        """Drop departed owners' locks (a restarted node's old run counts as departed)."""
        ls = self.ls
        alive = set(ls.members)
        touched = set()
        for name, res in ls.masters.items():
            if res.purge(lambda key: key[0] not in alive or key[0] in gone):
                touched.add(name)
        return touched

    async def _remaster(self, seq: int, rsbs: list) -> None:
        ls = self.ls
        asked = []
        for rsb in rsbs:
            dir_node = directory_node(rsb.name, ls.members)
            if dir_node == ls.node_id:
                self._rlookup[(ls.epoch, rsb.name)] = ls.directory.lookup(rsb.name, ls.node_id)
            else:
                ls._send(dir_node, MsgType.RLOOKUP, rsb.name)
            asked.append(rsb)
        await self._wait(
            seq, lambda: all((ls.epoch, r.name) in self._rlookup for r in asked),
            "new masters",
            lambda: f"directory nodes of {sum((ls.epoch, r.name) not in self._rlookup for r in asked)} resources",
        )  # fmt: skip
        for rsb in asked:
            master = self._rlookup.pop((ls.epoch, rsb.name))
            rows = []
            for lkid in sorted(rsb.lkids):
                h = ls.handles[lkid]
                if h.mode == Mode.IV:
                    continue  # never granted: its request is resent instead
                flags = h.flags & ~(Flag.NOEXP | Flag.CONVERT | Flag.QUECVT)
                rows.append([lkid, h.mode, Mode.IV, flags, h.bast is not None, h.lvb, h.lvbseq])
            rsb.master = master
            self.remastered.add(rsb.name)
            if master == ls.node_id:
                self._rebuild_remote(ls.node_id, rsb.name, rows)
            else:
                ls._send(master, MsgType.RLOCKS, rsb.name, rows)

    def _forget_old(self, epoch: int) -> None:
        for key in [k for k in self._barriers if k[0] <= epoch]:
            del self._barriers[key]
        for key3 in [k for k in self._barrier_data if k[0] < epoch]:
            del self._barrier_data[key3]
        for e in [e for e in self._dir_names if e <= epoch]:
            del self._dir_names[e]
        for key in [k for k in self._rlookup if k[0] <= epoch]:
            del self._rlookup[key]
