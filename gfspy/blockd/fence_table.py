"""The persistent fence table: who is banned from this server and who is admitted.

A ban must survive a crash of the server the instant after it was acknowledged, so every
change is written to a temp file, fsynced, renamed over the old table and the directory
fsynced before the caller may reply.  Pure policy (`may_connect`) is kept apart from the
persistence so it can be reasoned about on its own.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

TABLE_FILE = "fence-table.json"
FORMAT_VERSION = 1


class FenceTableError(Exception):
    """The table on disk cannot be read, or a request contradicts it."""


@dataclass
class NodeRecord:
    """What this server knows about one node.

    `fenced_all` bans every incarnation; `banned` holds single banned incarnations.
    While any ban exists only an explicitly `admitted` (newer) incarnation may connect.
    `epoch` is the highest membership epoch seen for the node, so a delayed ADMIT from an
    older view cannot undo a newer FENCE.
    """

    fenced_all: bool = False
    banned: set[int] = field(default_factory=set)
    admitted: int | None = None
    epoch: int = 0

    @property
    def is_fenced(self) -> bool:
        return self.fenced_all or bool(self.banned)

    def to_json(self) -> dict:
        return {
            "fenced_all": self.fenced_all,
            "banned": sorted(f"{i:x}" for i in self.banned),
            "admitted": None if self.admitted is None else f"{self.admitted:x}",
            "epoch": self.epoch,
        }

    @classmethod
    def from_json(cls, raw: dict) -> NodeRecord:
        admitted = raw.get("admitted")
        return cls(
            fenced_all=bool(raw.get("fenced_all", False)),
            banned={int(x, 16) for x in raw.get("banned", [])},
            admitted=None if admitted is None else int(admitted, 16),
            epoch=int(raw.get("epoch", 0)),
        )


class FenceTable:
    """In-memory table mirrored to `<state_dir>/fence-table.json`."""

    def __init__(self, state_dir: str | None) -> None:
        self.state_dir = state_dir
        self.nodes: dict[str, NodeRecord] = {}

    @property
    def path(self) -> str | None:
        return None if self.state_dir is None else os.path.join(self.state_dir, TABLE_FILE)

    # --- policy -----------------------------------------------------------------

    def may_connect(self, node: str, incarnation: int | None) -> tuple[bool, str]:
        """Decide whether (node, incarnation) may open an export, and say why not."""
        record = self.nodes.get(node)
        if record is None or not record.is_fenced:
            return True, ""
        if record.fenced_all:
            return False, f"node {node} is fenced"
        if incarnation in record.banned:
            return False, f"node {node} incarnation {incarnation:x} is fenced"
        if incarnation is None or incarnation != record.admitted:
            return False, f"node {node} is fenced; only an admitted incarnation may connect"
        return True, ""

    def fenced_nodes(self) -> list[str]:
        return sorted(n for n, r in self.nodes.items() if r.is_fenced)

    def is_banned(self, node: str, incarnation: int | None) -> bool:
        return not self.may_connect(node, incarnation)[0]

    # --- changes (in memory; the caller persists with `save` before replying) ----

    def fence(self, node: str, incarnation: int | None, epoch: int) -> None:
        """Ban one incarnation, or all of them when `incarnation` is None."""
        record = self.nodes.setdefault(node, NodeRecord())
        if incarnation is None:
            record.fenced_all = True
            record.admitted = None
        else:
            record.banned.add(incarnation)
            if record.admitted == incarnation:
                record.admitted = None
        record.epoch = max(record.epoch, epoch)

    def admit(self, node: str, incarnation: int, epoch: int) -> None:
        """Let a new incarnation of a node in again (the cluster manager's unfence)."""
        record = self.nodes.setdefault(node, NodeRecord())
        if epoch < record.epoch:
            raise FenceTableError(f"stale epoch {epoch} for node {node} (table has {record.epoch})")
        if incarnation in record.banned:
            raise FenceTableError(f"incarnation {incarnation:x} of node {node} stays fenced")
        record.fenced_all = False
        record.admitted = incarnation
        record.epoch = epoch

    def unfence(self, node: str, epoch: int | None) -> None:
        """Lift every ban on a node (the administrator's manual unfence).

        With `epoch` None the operator overrides the epoch check and the recorded
        epoch is kept.
        """
        record = self.nodes.get(node)
        if record is None:
            return
        if epoch is None:
            epoch = record.epoch
        if epoch < record.epoch:
            raise FenceTableError(f"stale epoch {epoch} for node {node} (table has {record.epoch})")
        record.fenced_all = False
        record.banned.clear()
        record.admitted = None
        record.epoch = epoch

    def to_json(self) -> dict:
        return {name: rec.to_json() for name, rec in sorted(self.nodes.items())}

    # --- persistence ------------------------------------------------------------

    def load(self) -> None:
        """Read the table; a missing file is an empty table, a corrupt one is an error.

        Silent, so that a server that cannot start prints only its one error line.
        """
        path = self.path
        if path is None:
            return
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            raise FenceTableError(f"{path}: cannot read fence table: {e}") from None
        try:
            if raw.get("version") != FORMAT_VERSION:
                raise FenceTableError(f"{path}: unknown fence table version {raw.get('version')}")
            self.nodes = {n: NodeRecord.from_json(r) for n, r in raw["nodes"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise FenceTableError(f"{path}: malformed fence table: {e}") from None

    def serialize(self) -> bytes:
        """A snapshot of the table, taken where no other change can interleave."""
        doc = {"version": FORMAT_VERSION, "nodes": self.to_json()}
        return json.dumps(doc, indent=1).encode("utf-8")

    def save(self, data: bytes | None = None) -> None:
        """Write temp, fsync, rename, fsync the directory: durable before any reply.

        Blocking: servers run it in a worker thread with a snapshot from `serialize`.
        """
        path = self.path
        if path is None:
            return
        if data is None:
            data = self.serialize()
        tmp = f"{path}.tmp.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        dir_fd = os.open(self.state_dir or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
