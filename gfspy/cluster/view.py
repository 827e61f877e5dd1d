"""Membership views: the contract between the cluster layer and the lock manager.

The cluster layer agrees on a sequence of views, each numbered by `epoch`; every member
processes the same sequence. The DLM only ever acts on a view handed to it after quorum
is confirmed and every removed node has been fenced, which is the whole safety argument
of recovery (see DESIGN.md, decision 4).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, order=True)
class Member:
    """One node in a view: its configured id, this run's incarnation, its DLM address."""

    node_id: int
    incarnation: int = field(compare=False)
    address: str = field(default="", compare=False)  # "host:port" of its DLM listener


@dataclass(frozen=True)
class View:
    """An agreed membership view."""

    epoch: int
    members: tuple[Member, ...]  # sorted by node_id
    quorate: bool
    #: Node ids that were members of the previous view and are not in this one; each must
    #: be fenced before any of their locks or journals are touched.
    removed: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        ids = [m.node_id for m in self.members]
        if ids != sorted(ids) or len(set(ids)) != len(ids):
            raise ValueError(f"view {self.epoch}: members must be unique and sorted by id")

    @property
    def member_ids(self) -> tuple[int, ...]:
        return tuple(m.node_id for m in self.members)

    def member(self, node_id: int) -> Member | None:
        for m in self.members:
            if m.node_id == node_id:
                return m
        return None

    @property
    def low_node(self) -> int:
        """The lowest member id: coordinator for barriers and fencing."""
        return self.members[0].node_id
