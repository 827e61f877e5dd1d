"""Driving lockspaces through a membership change, in the one safe order.

    agree view -> stop locking -> check quorum -> fence removed nodes (confirmed at every
    block server) -> DLM recovery (start(view)) -> resume

Nothing in this chain is skipped on a timeout (DESIGN.md decision 4): a step that cannot
complete leaves the lockspaces stopped and says what it waits for. Each step is written to
a journal of numbered events, which `gfspy status` shows and tests use to check order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from gfspy.cluster.fencing import Fencer
from gfspy.cluster.view import View

log = logging.getLogger(__name__)

MAX_EVENTS = 500


class Lockspace(Protocol):
    """What the cluster layer needs from a DLM lockspace."""

    name: str

    async def stop(self) -> None:
        """A membership change began: queue new lock calls, stop granting."""

    async def start(self, view: View) -> bool | None:
        """Run DLM recovery for `view` (quorate, every removed node fenced), then resume.

        Returns False when a stop() during recovery aborted it."""


@dataclass(frozen=True)
class Event:
    """One journal entry."""

    seq: int
    when: float
    kind: str
    epoch: int
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "when": self.when,
            "kind": self.kind,
            "epoch": self.epoch,
            "detail": self.detail,
        }


class EventJournal:
    """Numbered, bounded record of what this node did and in which order."""

    def __init__(self, my_id: int) -> None:
        self.my_id = my_id
        self.events: list[Event] = []
        self._seq = 0

    def add(self, kind: str, epoch: int, detail: str = "") -> None:
        self._seq += 1
        self.events.append(Event(self._seq, time.time(), kind, epoch, detail))
        del self.events[:-MAX_EVENTS]
        log.info("node %d: [%d] %s view %d %s", self.my_id, self._seq, kind, epoch, detail)


class RecoveryDriver:
    """Runs one recovery pass per committed view; a newer view or change aborts it."""

    def __init__(
        self,
        my_id: int,
        fencer: Fencer,
        journal: EventJournal,
        is_quorate: Callable[[], tuple[bool, str]],
        quorum_changed: Callable[[], trio.Event],
    ) -> None:
        self.my_id = my_id
        self.fencer = fencer
        self.journal = journal
        self.lockspaces: list[Lockspace] = []
        self._is_quorate = is_quorate
        self._quorum_changed = quorum_changed
        #: False from the moment a change is noticed (synchronously, so nobody can read a
        #: stale "running") until a recovery pass has completed.
        self.running = False
        self._lockspaces_stopped = True  # nothing runs before the first view
        #: Stopped by a change that produced no view (yet): only a new view restarts us.
        self.needs_view = False
        self.started_epoch = 0
        self.waiting_for = "the first view"
        self._pass_scope: trio.CancelScope | None = None
        self._pass_lock = trio.Lock()
        self._start_scopes: set[trio.CancelScope] = set()
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                # Shutting down: a DLM start() shielded from view changes must not keep
                # the process alive.
                for scope in self._start_scopes:
                    scope.shield = False
                    scope.cancel()

    async def wait_stopped(self) -> None:
        """Until every lockspace has been stopped (after change_began)."""
        while not self._lockspaces_stopped:
            await trio.sleep(0.01)

    def add_lockspace(self, ls: Lockspace) -> None:
        self.lockspaces.append(ls)

    def change_began(self, epoch: int, reason: str) -> None:
        """Stop locking at once, before the new view is even agreed."""
        self.journal.add("change_began", epoch, reason)
        self._begin_pass(None, epoch)

    def view_committed(self, view: View) -> None:
        self._begin_pass(view, view.epoch)

    @property
    def stopped(self) -> bool:
        return not self.running

    def _begin_pass(self, view: View | None, epoch: int) -> None:
        assert self._nursery is not None, "RecoveryDriver.run() is not running"
        self.running = False
        self.needs_view = False
        if self._pass_scope is not None:
            self._pass_scope.cancel()
        scope = trio.CancelScope()
        self._pass_scope = scope
        self._nursery.start_soon(self._pass, scope, view, epoch)

    async def _pass(self, scope: trio.CancelScope, view: View | None, epoch: int) -> None:
        # Stop first, without waiting for the previous pass: if that one is inside a DLM
        # start(), this stop() is what makes the DLM abandon it (a start() is never
        # cancelled from outside; the DLM aborts it at its next step and returns False).
        await self._stop_all(epoch)
        async with self._pass_lock:  # the previous pass has fully unwound
            with scope:
                await self._stop_all(epoch)
                if view is None:
                    if scope is self._pass_scope:  # not overtaken by a newer change
                        self.waiting_for = "agreement on a new view"
                        self.needs_view = True
                    return
                await self._recover(view)

    async def _stop_all(self, epoch: int) -> None:
        if self._lockspaces_stopped:
            return
        self.waiting_for = "lockspaces to stop"
        # Shielded: a half-done stop is worse than a late one.
        with trio.CancelScope(shield=True):
            for ls in self.lockspaces:
                await ls.stop()
                self.journal.add("ls_stopped", epoch, ls.name)
            self._lockspaces_stopped = True

    async def _recover(self, view: View) -> None:
        epoch = view.epoch
        self.journal.add(
            "view_agreed", epoch, f"members {list(view.member_ids)} removed {sorted(view.removed)}"
        )
        reported = ""
        while True:
            quorate, why = self._is_quorate()
            if quorate:
                break
            changed = self._quorum_changed()
            self.waiting_for = f"quorum ({why})"
            if why != reported:
                reported = why
                log.warning("node %d: view %d: recovery waits for quorum: %s", self.my_id, epoch,
                            why)  # fmt: skip
            await changed.wait()
        self.journal.add("quorum_ok", epoch)
        pending = self.fencer.outstanding()
        if pending:
            keys = [(c.node_id, c.incarnation) for c in pending]
            names = ", ".join(f"node {n} ({i:#x})" for n, i in keys)
            self.waiting_for = f"fencing of {names}"
            log.warning(
                "node %d: view %d: recovery blocked until fenced: %s", self.my_id, epoch, names
            )
            await self.fencer.wait_fenced(keys)  # each confirmation is journaled as it lands
        self.journal.add("fencing_done", epoch)
        # From here the lockspaces count as started: a newer change must stop() them.
        self._lockspaces_stopped = False
        for ls in self.lockspaces:
            self.waiting_for = f"DLM recovery of lockspace {ls.name}"
            self.journal.add("ls_start", epoch, ls.name)
            # Shielded from newer passes (they stop() the DLM, which aborts it cleanly);
            # only daemon shutdown cancels it.
            with trio.CancelScope(shield=True) as start_scope:
                self._start_scopes.add(start_scope)
                try:
                    completed = await ls.start(view)
                finally:
                    self._start_scopes.discard(start_scope)
            if completed is False:
                self.journal.add("ls_start_aborted", epoch, ls.name)
                return  # a newer change stopped it; its own pass takes over
            self.journal.add("ls_started", epoch, ls.name)
            await trio.lowlevel.checkpoint()  # a newer pass cancelled us: do not resume
        self.running = True
        self.started_epoch = epoch
        self.waiting_for = ""
        self.journal.add("running", epoch)
