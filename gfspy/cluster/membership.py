"""Agreed membership views, numbered by epoch (sans-IO).

The protocol, and why it is safe:

* The **coordinator** is the lowest-id member of the current view that this node still
  hears (before any view exists: the lowest-id node heard, among nodes with no view). It
  proposes view N = (epoch, prev_epoch, members) when the members it hears differ from the
  view: failed nodes drop out, new incarnations of fresh nodes join.
* It only proposes a membership that is **quorate**; a partitioned minority therefore
  never proposes, let alone commits, a view.
* A node **acks at most one proposal per epoch** (it acks only epochs above the highest it
  acked, and only if `prev_epoch` is the view it has committed). The coordinator commits
  only when **every** proposed member acked. Quorate member sets always intersect, so two
  different views can never both be committed for one epoch, and every member of a
  committed view had accepted exactly that view on top of the same previous view.
* COMMIT is sent to the members and the committed view is also gossiped in every
  heartbeat, so a member whose COMMIT was lost (or whose coordinator died half-way through
  sending it) completes the same view from any peer. A node never skips a view it acked
  and that was committed; views that were never committed are simply superseded.
* Incarnations: a member is identified by (node id, incarnation). A node removed from a
  view is never re-admitted with the same incarnation; the coordinator answers such a node
  with REJECT, and a node that sees a newer view without itself knows it was expelled and
  must stop (it restarts with a new incarnation, passing through fencing and a new join).
* Joins wait while a fence is outstanding, so a joiner never starts locking before the
  survivors have fenced everyone who needed it (reference §2.9, "fence in progress").
  The one exception is a restarted node replacing its own old incarnation: it joins in
  the view that removes the old one, and like every member waits for that fence.
* Epochs never repeat: the owner keeps the highest epoch acked in a state file and
  restores it at start, so a node refuses proposals at or below it (a Paxos promise).
* A clean leave (`leave()`, on SIGTERM) is announced; the member is then removed as
  "left", which needs no fence. A node that just disappears is "removed" and fenced.
* Links that fail in one place only: members gossip which members they heard and then
  lost; the coordinator drops the higher id of such a pair. A stranger that gossips a
  view of its own (another partition, an earlier cluster life) is told to stop when
  our partition outranks its own ("stateful merge", reference §6.7).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from gfspy.cluster.config import ClusterConfig
from gfspy.cluster.quorum import QuorumCalculator
from gfspy.cluster.view import Member, View

log = logging.getLogger(__name__)

#: Only the most recent removed incarnations travel in views; enough to outlive any
#: realistic restart of a removed node while keeping datagrams small.
MAX_REMOVED_HISTORY = 256


@dataclass(frozen=True)
class Proposal:
    """A proposed view: what the coordinator asks every member to accept."""

    epoch: int
    prev_epoch: int
    coordinator: int
    members: tuple[tuple[int, int], ...]  # (node_id, incarnation), sorted
    removed_history: tuple[tuple[int, int], ...] = ()
    #: Members of the view this one replaces, so a joiner learns who was removed (and
    #: must be fenced before its lockspaces start) exactly as the old members do.
    prev_members: tuple[tuple[int, int], ...] = ()
    #: Removed members that left cleanly (announced it before stopping): not fenced.
    left: tuple[tuple[int, int], ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "prev": self.prev_epoch,
            "coord": self.coordinator,
            "members": [list(m) for m in self.members],
            "removed": [list(r) for r in self.removed_history],
            "prevm": [list(m) for m in self.prev_members],
            "left": [list(m) for m in self.left],
        }

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> Proposal:
        return cls(
            epoch=int(body["epoch"]),
            prev_epoch=int(body["prev"]),
            coordinator=int(body["coord"]),
            members=tuple(sorted((int(a), int(b)) for a, b in body["members"])),
            removed_history=tuple((int(a), int(b)) for a, b in body.get("removed", [])),
            prev_members=tuple(sorted((int(a), int(b)) for a, b in body.get("prevm", []))),
            left=tuple(sorted((int(a), int(b)) for a, b in body.get("left", []))),
        )


# Actions the owner must carry out.
@dataclass(frozen=True)
class Send:
    """Send a membership message to one node (on the heartbeat socket)."""

    node_id: int
    kind: str
    body: dict[str, Any]


@dataclass(frozen=True)
class ChangeBegan:
    """A membership change is under way: stop locking now, before a view is agreed."""

    reason: str


@dataclass(frozen=True)
class ViewCommitted:
    """A view is agreed: the owner stops, fences `removed`, then starts the DLM."""

    view: View
    removed: dict[int, int]  # node id -> the incarnation that was removed (must be fenced)
    joined: dict[int, int]  # node id -> incarnation newly admitted
    founding: bool = False  # the first view of a new cluster (nobody had a view before)
    left: dict[int, int] = field(default_factory=dict)  # removed cleanly: no fence needed


@dataclass(frozen=True)
class Expelled:
    """This incarnation is no longer a member and can never be again: stop all I/O."""

    reason: str


Action = Send | ChangeBegan | ViewCommitted | Expelled


@dataclass
class _InFlight:
    proposal: Proposal
    acks: set[int] = field(default_factory=set)
    started: float = 0.0
    last_sent: float = 0.0


class Membership:
    """One node's side of the view protocol."""

    def __init__(
        self, config: ClusterConfig, my_id: int, incarnation: int, quorum: QuorumCalculator
    ) -> None:
        self.config = config
        self.my_id = my_id
        self.incarnation = incarnation
        self.quorum = quorum
        self.view = View(epoch=0, members=(), quorate=False)
        self.highest_acked = 0
        self.highest_seen = 0
        #: Proposals this node acked that are newer than its view, by epoch. One per
        #: epoch at most; a COMMIT or a peer's gossip completes the matching one.
        self.accepted: dict[int, Proposal] = {}
        self.removed_history: list[tuple[int, int]] = []
        self.expelled: str | None = None
        self.alive: dict[int, int] = {}  # peer id -> incarnation, fed by the failure detector
        self.peer_epoch: dict[int, int] = {}  # peer id -> committed epoch it gossips
        self.peer_members: dict[int, tuple[tuple[int, int], ...]] = {}  # ... and its members
        self.witnesses_reachable = 0
        self.fences_outstanding = False
        #: Set by the owner when its lockspaces were stopped (quorum lost, peers unheard)
        #: and can only restart through a new view, although the membership is the same.
        self.want_restart = False
        self.peer_restart: dict[int, int] = {}  # peer -> view epoch it wants restarted
        self.peer_unheard: dict[int, frozenset[int]] = {}
        #: Members that announced a clean leave (node id -> incarnation).
        self.leaving: dict[int, int] = {}
        #: Members we heard and then lost (failure detector), reported as "unheard".
        self.lost: set[tuple[int, int]] = set()
        self.has_left = False  # we announced our own leave: being dropped is expected
        self._in_flight: _InFlight | None = None
        self._change_announced = False

    def restore_epoch(self, epoch: int) -> None:
        """The highest epoch a previous incarnation acked (from the state file).

        A restarted node must not ack a proposal at or below it, or a new cluster life
        could reuse an epoch number with a different membership.
        """
        self.highest_acked = max(self.highest_acked, epoch)
        self.highest_seen = max(self.highest_seen, epoch)

    @property
    def durable_epoch(self) -> int:
        """What to keep in the state file: the highest epoch acked or committed."""
        return max(self.highest_acked, self.view.epoch)

    # ----- queries -------------------------------------------------------------------

    @property
    def is_member(self) -> bool:
        me = self.view.member(self.my_id)
        return me is not None and me.incarnation == self.incarnation

    def live_members(self) -> list[Member]:
        """Members of the committed view that are still heard with the same incarnation."""
        return [
            m
            for m in self.view.members
            if (m.node_id == self.my_id or self.alive.get(m.node_id) == m.incarnation)
            and self.leaving.get(m.node_id) != m.incarnation
        ]

    def coordinator(self) -> int | None:
        """Who proposes views in our partition (None: not us, and we are not a member)."""
        if self.expelled or self.has_left:
            return None
        if self.is_member:
            return min(m.node_id for m in self.live_members())
        # Bootstrap: only among nodes known (from their gossip) to have no view yet, and
        # not while we have accepted someone else's proposal.
        if (
            self.view.epoch == 0
            and all(q.coordinator == self.my_id for q in self.accepted.values())
            and all(self.peer_epoch.get(p, -1) == 0 for p in self.alive)
        ):
            return min([self.my_id, *self.alive])
        return None  # joining an existing cluster: its coordinator will admit us

    def gossip(self) -> dict[str, Any]:
        """The view summary every heartbeat carries."""
        return {
            "epoch": self.view.epoch,
            "members": [[m.node_id, m.incarnation] for m in self.view.members],
            "acked": self.highest_acked,
            # The view we are stuck in, so a late request cannot restart a newer view.
            "restart": self.view.epoch if self.want_restart else 0,
            # Members of our view we no longer hear: lets the coordinator resolve links that
            # fail in one place only (it hears both ends, they do not hear each other).
            # Only nodes heard and then lost: a member not heard *yet* (it just joined, its
            # first heartbeat is on the way) must not get anyone dropped.
            "unheard": [
                m.node_id for m in self.view.members if (m.node_id, m.incarnation) in self.lost
            ],
        }

    # ----- inputs --------------------------------------------------------------------

    def peer_alive(self, node_id: int, incarnation: int) -> list[Action]:
        self.alive[node_id] = incarnation
        self.lost.discard((node_id, incarnation))
        return []

    def peer_gone(self, node_id: int, incarnation: int, why: str) -> list[Action]:
        """The failure detector gave up on (node_id, incarnation)."""
        if self.alive.get(node_id) == incarnation:
            del self.alive[node_id]
            self.peer_epoch.pop(node_id, None)
            self.peer_members.pop(node_id, None)
            self.peer_unheard.pop(node_id, None)
        member = self.view.member(node_id)
        if self.is_member and member is not None and member.incarnation == incarnation:
            self.lost.add((node_id, incarnation))
            return self._announce_change(f"node {node_id} {why}")
        return []

    def heard_gossip(self, sender: int, incarnation: int, gossip: dict[str, Any]) -> list[Action]:
        """A peer's heartbeat summary: completes lost commits, detects our own removal."""
        if self.expelled or self.alive.get(sender) != incarnation:
            return []
        try:
            epoch = int(gossip["epoch"])
            members = tuple(sorted((int(a), int(b)) for a, b in gossip["members"]))
            acked = int(gossip.get("acked", 0))
        except (KeyError, TypeError, ValueError):
            return []
        self.peer_epoch[sender] = epoch
        self.highest_seen = max(self.highest_seen, epoch, acked)
        me = (self.my_id, self.incarnation)
        self.peer_members[sender] = members
        restart = gossip.get("restart", 0)
        self.peer_restart[sender] = restart if isinstance(restart, int) else 0
        try:
            self.peer_unheard[sender] = frozenset(int(n) for n in gossip.get("unheard", ()))
        except (TypeError, ValueError):
            self.peer_unheard[sender] = frozenset()
        ours = self.accepted.get(epoch)
        if ours is not None and ours.members == members:
            log.info("node %d: view %d completed from node %d's gossip", self.my_id, epoch, sender)
            return self._commit(ours)
        if epoch > self.view.epoch and self.view.epoch > 0 and self.is_member and me not in members:
            return self._expel(f"node {sender} reports view {epoch} without this node")
        return []

    def receive(
        self, sender: int, incarnation: int, kind: str, body: dict[str, Any], now: float
    ) -> list[Action]:
        """A membership message arrived from (sender, incarnation)."""
        if self.expelled:
            return []
        try:
            if kind == "propose":
                return self._on_propose(sender, Proposal.from_wire(body))
            if kind == "ack":
                return self._on_ack(sender, incarnation, int(body["epoch"]), now)
            if kind == "nack":
                self.highest_seen = max(self.highest_seen, int(body["acked"]), int(body["epoch"]))
                if self._in_flight and self._in_flight.proposal.epoch == int(body["for"]):
                    log.info(
                        "node %d: proposal %d refused by node %d (its view %s, acked %s)",
                        self.my_id,
                        body["for"],
                        sender,
                        body["epoch"],
                        body["acked"],
                    )
                    self._in_flight = None
                return []
            if kind == "commit":
                p = Proposal.from_wire(body)
                if self.accepted.get(p.epoch) == p:
                    return self._commit(p)
                return []
            if kind == "leave":
                member = self.view.member(sender)
                if member is None or member.incarnation != incarnation:
                    return []
                if self.leaving.get(sender) != incarnation:
                    log.info("node %d: node %d is leaving cleanly", self.my_id, sender)
                    self.leaving[sender] = incarnation
                return self._announce_change(f"node {sender} is leaving")
            if kind == "reject":
                # Only for us if it names our incarnation: a reject meant for the previous
                # process on this address must not stop its successor.
                if int(body.get("incarnation", -1)) != self.incarnation:
                    return []
                return self._expel(f"node {sender} refused this incarnation: {body.get('why')}")
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("node %d: malformed %s from node %d: %s", self.my_id, kind, sender, exc)
        return []

    def tick(self, now: float) -> list[Action]:
        """Coordinator duties: propose a new view when the heard membership differs."""
        if self.expelled or self.coordinator() != self.my_id:
            self._in_flight = None
            return self._reject_stale_incarnations()
        actions = self._reject_stale_incarnations()
        desired = self._desired_members()
        current = tuple(sorted((m.node_id, m.incarnation) for m in self.view.members))
        flight = self._in_flight
        if flight is not None:
            if flight.proposal.members != desired or now - flight.started > (
                self.config.timeouts.proposal_timeout
            ):
                log.info("node %d: abandoning proposal %d", self.my_id, flight.proposal.epoch)
                self._in_flight = flight = None
            else:
                if now - flight.last_sent >= self.config.timeouts.heartbeat_interval:
                    flight.last_sent = now
                    actions += self._send_proposal(flight.proposal, skip=flight.acks)
                return actions
        restart = self.view.epoch > 0 and (
            self.want_restart
            or any(self.peer_restart.get(m.node_id) == self.view.epoch for m in self.live_members())
        )
        if not desired or (desired == current and not restart):
            return actions
        status = self.quorum.evaluate([n for n, _ in desired], self.witnesses_reachable)
        if not status.quorate:
            return actions
        epoch = max(self.view.epoch, self.highest_acked, self.highest_seen) + 1
        removed = [
            (m.node_id, m.incarnation)
            for m in self.view.members
            if (m.node_id, m.incarnation) not in desired
        ]
        history = (self.removed_history + removed)[-MAX_REMOVED_HISTORY:]
        left = tuple(r for r in removed if self.leaving.get(r[0]) == r[1])
        proposal = Proposal(
            epoch, self.view.epoch, self.my_id, desired, tuple(history), current, left
        )
        log.info(
            "node %d: proposing view %d members %s (was view %d %s)",
            self.my_id,
            epoch,
            [n for n, _ in desired],
            self.view.epoch,
            list(self.view.member_ids),
        )
        self.highest_acked = epoch
        self.accepted[epoch] = proposal
        self._in_flight = _InFlight(proposal, {self.my_id}, now, now)
        actions += self._announce_change(f"proposing view {epoch}")
        actions += self._send_proposal(proposal, skip={self.my_id})
        return actions + self._maybe_commit()

    # ----- internals -----------------------------------------------------------------

    def _desired_members(self) -> tuple[tuple[int, int], ...]:
        removed = set(self.removed_history)
        if self.is_member:
            keep = {(m.node_id, m.incarnation) for m in self.live_members()}
            # Two members that cannot hear each other cannot both stay: the higher id goes
            # (never the coordinator, which is the lowest id and hears everyone it keeps).
            for reporter in sorted(self.peer_unheard):
                ids = {n for n, _ in keep}
                if reporter not in ids:
                    continue
                for lost in sorted(self.peer_unheard[reporter] & ids):
                    drop = max(reporter, lost)
                    log.debug(
                        "node %d: node %d cannot hear node %d; dropping node %d",
                        self.my_id, reporter, lost, drop,
                    )  # fmt: skip
                    keep = {(n, i) for n, i in keep if n != drop}
                    if drop == reporter:
                        break
        else:
            keep = {(self.my_id, self.incarnation)}
        # A restarted node's new incarnation may join in the same view that removes its
        # old one: every member, the joiner included, still waits for that fence.
        staying = {n for n, _ in keep}
        configured = set(self.config.node_ids)
        if not self.fences_outstanding:
            for node_id, inc in self.alive.items():
                fresh = self.peer_epoch.get(node_id, -1) == 0 or self.view.epoch == 0
                if (
                    node_id in configured
                    and node_id not in staying
                    and (node_id, inc) not in removed
                    and fresh
                ):
                    keep.add((node_id, inc))
        return tuple(sorted(keep))

    def _reject_stale_incarnations(self) -> list[Action]:
        """Tell removed incarnations, and stateful strangers we outrank, to stop."""
        if not self.is_member:
            return []
        removed = set(self.removed_history)
        live = self.live_members()
        in_view = {m.node_id for m in self.view.members}
        quorate = self.quorum.evaluate([m.node_id for m in live], self.witnesses_reachable)
        sends: list[Action] = []
        for n, inc in self.alive.items():
            if (n, inc) in removed:
                why = f"incarnation {inc:#x} of node {n} was removed"
            elif (
                n not in in_view
                and self.peer_epoch.get(n, 0) > 0
                and quorate.quorate
                and self._outranks(self.peer_members.get(n, ()), live)
            ):
                # A node carrying a view of another partition or an earlier cluster life
                # ("stateful merge"): its locks and caches are unknown to us, so it may not
                # merge; it must restart (and is fenced like any node that left).
                why = f"node {n} holds view {self.peer_epoch[n]} from another partition"
            else:
                continue
            sends.append(Send(n, "reject", {"incarnation": inc, "why": why}))
        return sends

    @staticmethod
    def _outranks(theirs: tuple[tuple[int, int], ...], ours: list[Member]) -> bool:
        """Larger partition wins; on a tie, the one holding the lowest node id."""
        if not theirs:
            return True
        mine = (len(ours), -min(m.node_id for m in ours))
        return mine > (len(theirs), -min(n for n, _ in theirs))

    def _send_proposal(self, proposal: Proposal, skip: set[int]) -> list[Action]:
        wire = proposal.to_wire()
        return [Send(n, "propose", wire) for n, _ in proposal.members if n not in skip]

    def _on_propose(self, sender: int, p: Proposal) -> list[Action]:
        me = (self.my_id, self.incarnation)
        if me not in p.members:
            return []
        if self.accepted.get(p.epoch) == p:  # a retransmission: our ack was lost
            return [Send(sender, "ack", {"epoch": p.epoch})]
        # A member only builds on the view it has; a joiner has no view to build on.
        if p.epoch <= self.highest_acked or (self.is_member and p.prev_epoch != self.view.epoch):
            return [
                Send(
                    sender,
                    "nack",
                    {"for": p.epoch, "epoch": self.view.epoch, "acked": self.highest_acked},
                )
            ]
        self.highest_acked = p.epoch
        self.accepted[p.epoch] = p
        log.info("node %d: accepted proposal of view %d from node %d", self.my_id, p.epoch, sender)
        actions = self._announce_change(f"view {p.epoch} proposed by node {sender}")
        return actions + [Send(sender, "ack", {"epoch": p.epoch})]

    def _on_ack(self, sender: int, incarnation: int, epoch: int, now: float) -> list[Action]:
        flight = self._in_flight
        if flight is None or flight.proposal.epoch != epoch:
            return []
        if (sender, incarnation) in flight.proposal.members:
            flight.acks.add(sender)
        return self._maybe_commit()

    def _maybe_commit(self) -> list[Action]:
        flight = self._in_flight
        if flight is None or flight.acks != {n for n, _ in flight.proposal.members}:
            return []
        p = flight.proposal
        self._in_flight = None
        wire = p.to_wire()
        sends: list[Action] = [Send(n, "commit", wire) for n, _ in p.members if n != self.my_id]
        return sends + self._commit(p)

    def _commit(self, p: Proposal) -> list[Action]:
        old = dict(p.prev_members) if p.prev_epoch else {}
        new = dict(p.members)
        gone = {n: inc for n, inc in old.items() if new.get(n) != inc}
        left = {n: inc for n, inc in gone.items() if (n, inc) in set(p.left)}
        removed = {n: inc for n, inc in gone.items() if n not in left}
        joined = {n: inc for n, inc in new.items() if old.get(n) != inc}
        members = tuple(
            Member(n, inc, self.config.node(n).address) for n, inc in sorted(new.items())
        )
        status = self.quorum.evaluate(new, self.witnesses_reachable)
        view = View(
            epoch=p.epoch, members=members, quorate=status.quorate, removed=frozenset(removed)
        )
        history = set(self.removed_history)
        merged = list(self.removed_history) + [r for r in p.removed_history if r not in history]
        merged += [r for r in gone.items() if r not in set(merged)]
        self.removed_history = merged[-MAX_REMOVED_HISTORY:]
        self.view = view
        self.want_restart = False
        self.peer_restart.clear()
        self.accepted = {e: q for e, q in self.accepted.items() if e > p.epoch}
        if self._in_flight is not None and self._in_flight.proposal.prev_epoch != p.epoch:
            self._in_flight = None  # built on a view that is no longer ours
        self.highest_acked = max(self.highest_acked, p.epoch)
        self._change_announced = False
        self.leaving = {n: i for n, i in self.leaving.items() if new.get(n) == i}
        self.lost = {(n, i) for n, i in self.lost if new.get(n) == i}
        log.info(
            "node %d: committed view %d members %s removed %s left %s joined %s",
            self.my_id,
            p.epoch,
            list(view.member_ids),
            sorted(removed),
            sorted(left),
            sorted(joined),
        )
        return [ViewCommitted(view, removed, joined, founding=p.prev_epoch == 0, left=left)]

    def leave(self) -> list[Action]:
        """Announce a clean leave to every member: this process stops all I/O and exits."""
        if not self.is_member:
            return []
        self.has_left = True
        return [Send(m.node_id, "leave", {}) for m in self.view.members if m.node_id != self.my_id]

    def _announce_change(self, reason: str) -> list[Action]:
        if self._change_announced or not self.is_member:
            return []
        self._change_announced = True
        return [ChangeBegan(reason)]

    def _expel(self, reason: str) -> list[Action]:
        if self.expelled:
            return []
        if self.has_left:
            log.info("node %d: the cluster carries on without us (%s)", self.my_id, reason)
            self.expelled = reason
            return []
        self.expelled = reason
        self.accepted.clear()
        self._in_flight = None
        log.error("node %d: expelled from the cluster: %s", self.my_id, reason)
        return [Expelled(reason)]
