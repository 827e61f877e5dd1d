"""The DLM lockspaces a node daemon drives, and their admin operations.

The daemon only needs `stop()` and `start(view)` (see `recovery.Lockspace`); this module
wraps `gfspy.dlm.lockspace.Lockspace` with them and adds what `gfspy lockdump` and the
multi-process tests need: a dump, and `lock`/`convert`/`unlock`/`locks` admin operations
so a test can hold a lock in one process and watch who gets it after that process dies.
Every lock completion is written to the daemon's event journal, so the order of "fence
confirmed" and "lock granted" can be checked from outside.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from gfspy.cluster.recovery import EventJournal
from gfspy.cluster.view import View
from gfspy.dlm.lockspace import LockHandle
from gfspy.dlm.lockspace import Lockspace as DLMLockspace
from gfspy.dlm.modes import LVB_LEN, DLMError, Flag, Mode, SBFlag, status_name
from gfspy.dlm.transport import Transport

log = logging.getLogger(__name__)


def _mode(value: Any) -> int:
    if isinstance(value, str) and value.upper() in Mode.__members__:
        return Mode[value.upper()]
    raise ValueError(f"bad lock mode {value!r} (NL, CR, CW, PR, PW or EX)")


def _printable(value: Any) -> Any:
    """Lock names and LVBs are bytes; keep text readable and binary as hex."""
    if isinstance(value, bytes):
        try:
            text = value.decode("ascii")
            if text.isprintable():
                return text
        except UnicodeDecodeError:
            pass
        return "0x" + value.hex()
    if isinstance(value, dict):
        return {str(_printable(k)): _printable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_printable(v) for v in value]
    return value


class ClusterLockspace:
    """One DLM lockspace, driven by the cluster daemon."""

    def __init__(self, name: str, transport: Transport, journal: EventJournal) -> None:
        self.name = name
        self.dlm = DLMLockspace(name, transport)
        self.journal = journal
        self.admin_handles: dict[int, LockHandle] = {}

    async def stop(self) -> None:
        await self.dlm.stop()

    async def start(self, view: View) -> bool:
        completed = await self.dlm.start(view)
        if not completed:
            # A newer stop() arrived; the driver runs the next pass.
            log.info("lockspace %s: recovery of view %d superseded", self.name, view.epoch)
        return completed

    # ----- admin operations ----------------------------------------------------------

    def _on_completion(self, handle: LockHandle) -> None:
        status = handle.status if handle.status is not None else 0
        kind = "lock_granted" if status == 0 and handle.mode >= Mode.NL else "lock_completed"
        flags = " VALNOTVALID" if handle.sbflags & SBFlag.VALNOTVALID else ""
        self.journal.add(
            kind,
            self.dlm.epoch,
            f"{self.name} {handle.name.decode(errors='replace')} lkid {handle.lkid} "
            f"{Mode(handle.mode).name} status {status_name(status)}{flags}",
        )

    def _row(self, h: LockHandle) -> dict[str, Any]:
        return {
            "lkid": h.lkid,
            "name": _printable(h.name),
            "mode": Mode(h.mode).name,
            "op": h.op or "",
            "status": None if h.status is None else status_name(h.status),
            "sbflags": int(h.sbflags),
            "valnotvalid": bool(h.sbflags & SBFlag.VALNOTVALID),
            "lvb": h.lvb,
            "lvbseq": h.lvbseq,
            "gone": h.gone,
        }

    async def _settle(self, handle: LockHandle, wait: float) -> None:
        if wait > 0:
            with trio.move_on_after(wait):
                await handle.wait()

    def _handle(self, request: dict[str, Any]) -> LockHandle:
        lkid = int(request["lkid"])
        handle = self.admin_handles.get(lkid)
        if handle is None:
            raise ValueError(f"no lock {lkid} taken through the admin endpoint")
        return handle

    async def admin_lock(self, request: dict[str, Any]) -> dict[str, Any]:
        flags = Flag.VALBLK if request.get("valblk") else 0
        if request.get("noqueue"):
            flags |= Flag.NOQUEUE
        lvb = request.get("lvb")
        if flags & Flag.VALBLK and lvb is None:
            lvb = bytes(LVB_LEN)  # the buffer the value block is read into
        try:
            handle = self.dlm.request(
                str(request["name"]), _mode(request["mode"]), flags, lvb, ast=self._on_completion
            )
        except DLMError as exc:
            raise ValueError(str(exc)) from None
        self.admin_handles[handle.lkid] = handle
        await self._settle(handle, float(request.get("wait", 0)))
        return self._row(handle)

    async def admin_convert(self, request: dict[str, Any]) -> dict[str, Any]:
        handle = self._handle(request)
        flags = Flag.VALBLK if request.get("valblk") else 0
        try:
            self.dlm.request_convert(handle, _mode(request["mode"]), flags, request.get("lvb"))
        except DLMError as exc:
            raise ValueError(str(exc)) from None
        await self._settle(handle, float(request.get("wait", 0)))
        return self._row(handle)

    async def admin_unlock(self, request: dict[str, Any]) -> dict[str, Any]:
        handle = self._handle(request)
        lvb = request.get("lvb")
        try:
            self.dlm.request_unlock(handle, Flag.VALBLK if lvb is not None else 0, lvb)
        except DLMError as exc:
            raise ValueError(str(exc)) from None
        await self._settle(handle, float(request.get("wait", 0)))
        return self._row(handle)

    async def admin_locks(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"locks": [self._row(h) for h in self.admin_handles.values()]}

    async def admin_lockdump(self, request: dict[str, Any]) -> dict[str, Any]:
        dump = self.dlm.dump()
        resources = []
        for entry in dump.pop("mastered", []):
            resources.append(
                {
                    "name": _printable(entry["name"]),
                    "master": entry["master"],
                    "granted": [_lock_text(lk) for lk in entry["granted"]],
                    "convert": [_lock_text(lk) for lk in entry["converting"]],
                    "waiting": [_lock_text(lk) for lk in entry["waiting"]],
                    "lvbseq": entry["lvbseq"],
                    "lvb_invalid": entry["lvb_invalid"],
                    "lvb": _printable(entry.get("lvb")),
                }
            )
        out = _printable(dump)
        out["lockspace"] = self.name
        out["resources"] = resources
        return out


def _lock_text(row: dict[str, Any]) -> str:
    key = row["key"]
    owner = f"node {key[0]} lkid {key[1]}" if isinstance(key, tuple | list) else str(key)
    granted, wanted = row["grmode"], row["rqmode"]
    if granted == "IV":
        mode = wanted  # waiting: only the requested mode means anything
    elif wanted in ("IV", granted):
        mode = granted
    else:
        mode = f"{granted}->{wanted}"
    return f"{mode:<8} {owner}"


def open_lockspace(name: str, transport: Transport, journal: EventJournal) -> ClusterLockspace:
    """The lockspace `name` on this node's DLM transport."""
    return ClusterLockspace(name, transport, journal)
