"""Quorum arithmetic: may this partition act (commit views, fence, run recovery)?

Pure and sans-IO: callers feed it who is a member, how many block servers they can reach
and the time, and it answers. The rules follow votequorum, because operators know them:

* quorum = floor(expected_votes / 2) + 1, so two disjoint partitions can never both hold it;
* `two_node`: with exactly two nodes and no witness, quorum is 1 (safe only because the
  storage fence is serialized at the block server, so only one side can win a fence race);
  it implies `wait_for_all`;
* `wait_for_all`: never quorate until every configured node has been seen alive at once,
  so a partial first start cannot fence nodes that are merely slow to boot;
* `witness`: every storage server whose control port this node can reach adds one vote
  (the block server is a single point the cluster depends on anyway, so it is a natural
  tie-breaker);
* `last_man_standing`: once a smaller membership has been stable and quorate for the
  window, expected votes drop to what is present (never below 2), so cascading failures
  can leave a quorate remainder.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from gfspy.cluster.config import ClusterConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuorumStatus:
    """The answer to 'may we act?', with the numbers behind it for status output."""

    quorate: bool
    votes: int  # node votes + witness votes counted
    expected_votes: int
    quorum: int  # votes needed
    witness_votes: int
    reason: str  # why not quorate, or "" when quorate

    def as_dict(self) -> dict[str, object]:
        return {
            "quorate": self.quorate,
            "votes": self.votes,
            "expected_votes": self.expected_votes,
            "quorum": self.quorum,
            "witness_votes": self.witness_votes,
            "reason": self.reason,
        }


def majority(expected_votes: int) -> int:
    """Votes needed so that two disjoint sets can never both have them."""
    return expected_votes // 2 + 1


class QuorumCalculator:
    """Holds the little state quorum needs (wait_for_all latch, last-man-standing)."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        q = config.quorum
        self.witness_total = len(config.storage) if q.witness else 0
        node_votes = sum(n.votes for n in config.nodes)
        self.configured_expected = (
            q.expected_votes if q.expected_votes is not None else node_votes + self.witness_total
        )
        self.expected_votes = self.configured_expected
        self.seen_all = not q.wait_for_all
        # last_man_standing: the membership we are timing and since when it has been stable.
        self._lms_members: frozenset[int] | None = None
        self._lms_since = 0.0

    def node_votes(self, member_ids: Iterable[int]) -> int:
        by_id = {n.node_id: n.votes for n in self.config.nodes}
        return sum(by_id.get(i, 0) for i in set(member_ids))

    def quorum(self) -> int:
        q = self.config.quorum
        if q.two_node and not q.witness:
            return 1
        return majority(self.expected_votes)

    def note_alive(self, alive_ids: Iterable[int]) -> None:
        """Latch wait_for_all once every configured node has been seen alive together."""
        if self.seen_all:
            return
        if set(self.config.node_ids) <= set(alive_ids):
            self.seen_all = True
            log.info(
                "quorum: all %d configured nodes seen; wait_for_all satisfied",
                len(self.config.nodes),
            )

    def evaluate(self, member_ids: Iterable[int], witnesses_reachable: int = 0) -> QuorumStatus:
        """Quorum of a (proposed or current) membership as seen from this node."""
        members = frozenset(member_ids)
        witness = min(witnesses_reachable, self.witness_total)
        votes = self.node_votes(members) + witness
        # Votes above the expected count raise it, as votequorum does: a node added to the
        # file but not yet to every daemon must not make a minority look like a majority.
        if votes > self.expected_votes:
            self.expected_votes = votes
        needed = self.quorum()
        if not self.seen_all:
            reason = "waiting for all nodes to be seen once (wait_for_all)"
            return QuorumStatus(False, votes, self.expected_votes, needed, witness, reason)
        if votes < needed:
            reason = f"{votes} of {self.expected_votes} votes, {needed} needed"
            return QuorumStatus(False, votes, self.expected_votes, needed, witness, reason)
        return QuorumStatus(True, votes, self.expected_votes, needed, witness, "")

    def observe_membership(
        self, member_ids: Iterable[int], witnesses_reachable: int, now: float
    ) -> None:
        """Feed the agreed membership over time; drives last_man_standing."""
        members = frozenset(member_ids)
        votes = self.node_votes(members) + min(witnesses_reachable, self.witness_total)
        q = self.config.quorum
        if not q.last_man_standing or not self.seen_all:
            return
        if members != self._lms_members:
            self._lms_members, self._lms_since = members, now
            return
        quorate_now = votes >= self.quorum()
        lowered = max(votes, 2)
        if (
            quorate_now
            and lowered < self.expected_votes
            and now - self._lms_since >= q.last_man_standing_window
        ):
            log.warning(
                "quorum: last_man_standing lowers expected votes %d -> %d (members %s)",
                self.expected_votes,
                lowered,
                sorted(members),
            )
            self.expected_votes = lowered
