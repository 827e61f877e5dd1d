"""Fencing: make a failed node's writes impossible, and prove it, before recovery.

A node that looks dead may only be paused or cut off; it still holds EX locks and may
still write. Recovery of a node therefore never starts until a fence of *that incarnation*
succeeded *after its failure* (reference §4.1). A failed fence is retried with backoff and
reported loudly, never skipped: a hung cluster is recoverable, a corrupted one is not.

Methods (a node's `[[node.fence]]` entries are levels, tried in order each round):

* `storage`: FENCE at every gfspy-blockd in cluster.toml, in parallel; success only when
  every server confirmed (one server still accepting the victim's writes is enough to
  corrupt the filesystem).
* `agent`: a fence_* program, following the fence-agents convention: `key=value` options,
  one per line on stdin; exit status 0 means the node is fenced.
* `manual`: an operator confirms with `gfspy fence-ack NODE` that the node is off. It is
  recorded in the history exactly like an automatic fence.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import trio

from gfspy.cluster.config import ClusterConfig, FenceMethod, NodeConfig

log = logging.getLogger(__name__)

MAX_HISTORY = 200
AGENT_OUTPUT_LIMIT = 400


@dataclass(frozen=True)
class FenceRecord:
    """One fence attempt (or a confirmation learned from the node that fenced)."""

    when: float  # wall-clock time
    node_id: int
    incarnation: int
    epoch: int
    method: str
    ok: bool
    detail: str
    actor: int  # node that ran the fence
    duration: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FenceCase:
    """What is known about fencing one incarnation of one node."""

    node_id: int
    incarnation: int
    epoch: int  # the view that removed it
    failed_at: float  # wall-clock time the membership removed it
    confirmed_at: float | None = None
    confirmed_by: str = ""
    attempts: int = 0
    last_error: str = ""
    actor: int | None = None
    #: Startup fence: the node was absent from a new cluster's first view, so whatever
    #: incarnation it may be running (incarnation 0 = any) must be fenced, unless it
    #: joins cleanly first.
    startup: bool = False

    @property
    def done(self) -> bool:
        # A success only counts if it came after the failure it answers.
        return self.confirmed_at is not None and self.confirmed_at >= self.failed_at

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["done"] = self.done
        return d


class FenceError(Exception):
    """One fence attempt failed; the message says why, for status and logs."""


def backoff_delay(round_number: int, first: float, maximum: float) -> float:
    """Delay before retry round `round_number` (1-based): doubling, capped."""
    exponent = min(round_number - 1, 30)
    return min(maximum, first * math.pow(2, exponent))


def agent_stdin(method: FenceMethod, node: NodeConfig) -> bytes:
    """The fence-agents stdin convention: one key=value per line.

    `action` defaults to "off": a fenced node must stay off until it rejoins through
    membership. `nodename` names the victim for agents that use it.
    """
    options = dict(method.options)
    options.setdefault("action", "off")
    options.setdefault("nodename", node.name)
    return "".join(f"{k}={v}\n" for k, v in options.items()).encode()


async def run_agent(method: FenceMethod, node: NodeConfig, timeout: float) -> str:
    """Run a fence agent once; return its output on exit status 0, else FenceError."""
    data = agent_stdin(method, node)
    try:
        with trio.fail_after(timeout):
            result = await trio.run_process(
                [method.command],
                stdin=data,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    except trio.TooSlowError:
        raise FenceError(f"agent {method.command} timed out after {timeout:g}s") from None
    except OSError as exc:
        raise FenceError(f"agent {method.command} could not run: {exc.strerror or exc}") from None
    output = (result.stdout + result.stderr).decode(errors="replace").strip()
    output = output[-AGENT_OUTPUT_LIMIT:]
    if result.returncode != 0:
        raise FenceError(
            f"agent {method.command} exited with status {result.returncode}: {output}".strip()
        )
    return output or f"agent {method.command} exited with status 0"


def _control_client() -> Any:
    # Imported late: the block server package belongs to another layer and must not be a
    # hard dependency of clusters that fence with agents only.
    from gfspy.blockd import control_client

    return control_client


def _confirmed(reply: Any) -> tuple[bool, str]:
    """Only an explicit CONFIRMED counts; FAILED, ERROR or anything else is a failure."""
    if isinstance(reply, dict) and reply.get("status") == "CONFIRMED":
        return True, "confirmed"
    if isinstance(reply, dict):
        return False, f"{reply.get('status', '?')}: {reply.get('reason', '')}".strip(": ")
    return False, f"unexpected answer {reply!r}"


async def fence_at_storage(
    config: ClusterConfig, node_id: int, incarnation: int, epoch: int, timeout: float
) -> str:
    """FENCE at every block server in parallel; FenceError unless all confirm."""
    if not config.storage:
        raise FenceError("no [[storage]] servers configured")
    try:
        client = _control_client()
    except ImportError as exc:
        raise FenceError(f"block server control client unavailable: {exc}") from None
    results: dict[str, str] = {}
    failures: dict[str, str] = {}

    node_name = config.node(node_id).name  # block servers know nodes by name (TLS CN)

    async def one(server_name: str, address: str) -> None:
        try:
            with trio.fail_after(timeout + 5.0):
                # Incarnation 0 (startup fence) means whatever incarnation it runs.
                reply = await client.fence_node(
                    address, node_name, epoch, incarnation=incarnation or None, timeout=timeout
                )
            ok, text = _confirmed(reply)
        except trio.TooSlowError:
            ok, text = False, f"no answer in {timeout:g}s"
        except Exception as exc:  # any failure to confirm is a failed fence, whatever it is
            ok, text = False, f"{type(exc).__name__}: {exc}"
        (results if ok else failures)[server_name] = text

    async with trio.open_nursery() as nursery:
        for server in config.storage:
            nursery.start_soon(one, server.name, server.control)
    if failures:
        detail = "; ".join(f"{name}: {why}" for name, why in sorted(failures.items()))
        raise FenceError(
            f"storage fence not confirmed by {len(failures)} of "
            f"{len(config.storage)} servers: {detail}"
        )
    return "confirmed by " + ", ".join(sorted(results))


class ManualAcks:
    """Operator acknowledgements (`gfspy fence-ack NODE`), with the time they were given."""

    def __init__(self) -> None:
        self._acks: dict[int, float] = {}
        self._changed = trio.Event()

    def add(self, node_id: int, when: float | None = None) -> bool:
        when = time.time() if when is None else when
        if self._acks.get(node_id, -1.0) >= when:
            return False
        self._acks[node_id] = when
        self._changed.set()
        self._changed = trio.Event()
        return True

    def since(self, node_id: int, after: float) -> float | None:
        when = self._acks.get(node_id)
        return when if when is not None and when >= after else None

    def items(self) -> list[tuple[int, float]]:
        return sorted(self._acks.items())

    async def wait_for(self, node_id: int, after: float) -> float:
        while (when := self.since(node_id, after)) is None:
            await self._changed.wait()
        return when


class SelfFenced(Exception):
    """This node lost a fence race: a block server has banned its incarnation."""


class Fencer:
    """Runs fences for this node (when it is the fence actor) and keeps the history."""

    def __init__(
        self,
        config: ClusterConfig,
        my_id: int,
        on_change: Callable[[], None] | None = None,
        my_incarnation: int | None = None,
    ) -> None:
        self.config = config
        self.my_id = my_id
        self.my_incarnation = my_incarnation
        self.cases: dict[tuple[int, int], FenceCase] = {}
        self.history: list[FenceRecord] = []
        self.manual_acks = ManualAcks()
        self._on_change = on_change or (lambda: None)
        self._changed = trio.Event()

    # ----- bookkeeping ---------------------------------------------------------------

    def need_fence(
        self, node_id: int, incarnation: int, epoch: int, failed_at: float, startup: bool = False
    ) -> FenceCase:
        key = (node_id, incarnation)
        case = self.cases.get(key)
        if case is None:
            case = FenceCase(node_id, incarnation, epoch, failed_at, startup=startup)
            self.cases[key] = case
            if startup:
                log.warning(
                    "node %d: node %d is absent from the cluster's first view %d: it will be "
                    "fenced unless it joins cleanly first", self.my_id, node_id, epoch,
                )  # fmt: skip
            else:
                log.warning(
                    "node %d: node %d (incarnation %#x) removed in view %d must be fenced",
                    self.my_id, node_id, incarnation, epoch,
                )  # fmt: skip
            self._notify()
        return case

    def outstanding(self) -> list[FenceCase]:
        return [c for c in self.cases.values() if not c.done]

    def joined_cleanly(self, node_id: int, incarnation: int, epoch: int) -> None:
        """A fresh incarnation joined: a pending startup fence of that node is moot."""
        for case in list(self.cases.values()):
            if case.node_id == node_id and case.startup and not case.done:
                detail = f"joined cleanly as incarnation {incarnation:#x}; startup fence cancelled"
                self.record(
                    FenceRecord(
                        time.time(), node_id, case.incarnation, epoch, "startup", True, detail,
                        self.my_id,
                    )
                )  # fmt: skip

    def is_fenced(self, node_id: int, incarnation: int) -> bool:
        case = self.cases.get((node_id, incarnation))
        return case is not None and case.done

    def record(self, rec: FenceRecord) -> None:
        self.history.append(rec)
        del self.history[:-MAX_HISTORY]
        case = self.cases.get((rec.node_id, rec.incarnation))
        if case is not None:
            if rec.ok:
                if not case.done and rec.when >= case.failed_at:
                    case.confirmed_at = rec.when
                    case.confirmed_by = f"{rec.method} by node {rec.actor}"
            else:
                case.attempts += 1
                case.last_error = rec.detail
        self._notify()

    def learn_confirmation(
        self, node_id: int, incarnation: int, epoch: int, when: float, method: str, actor: int
    ) -> None:
        """A peer (the fence actor) reports a confirmed fence."""
        case = self.cases.get((node_id, incarnation))
        if case is None:
            # We may learn of the fence before the view removing the node: keep it so the
            # view finds it done (the failure preceded the fence by construction).
            case = FenceCase(node_id, incarnation, epoch, failed_at=when)
            self.cases[(node_id, incarnation)] = case
        if case.done:
            return
        # The actor checked its fence came after the failure; clocks of different
        # machines may disagree, so never let skew turn its confirmation into "too early".
        when = max(when, case.failed_at)
        self.record(
            FenceRecord(
                when, node_id, incarnation, epoch, method, True, f"confirmed by node {actor}", actor
            )
        )
        log.info(
            "node %d: learned node %d incarnation %#x fenced (%s) by node %d",
            self.my_id,
            node_id,
            incarnation,
            method,
            actor,
        )

    def confirmations(self) -> list[list[Any]]:
        """Gossip form of every confirmed case: [node, inc, epoch, when, method, actor]."""
        out = []
        for c in self.cases.values():
            if c.done:
                method, _, actor = c.confirmed_by.partition(" by node ")
                out.append(
                    [
                        c.node_id,
                        c.incarnation,
                        c.epoch,
                        c.confirmed_at,
                        method,
                        int(actor or self.my_id),
                    ]
                )
        return out[-64:]

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
        self._on_change()

    async def wait_changed(self) -> None:
        await self._changed.wait()

    async def wait_fenced(self, keys: list[tuple[int, int]]) -> None:
        """Block until every (node, incarnation) in keys has a confirmed fence."""
        while not all(self.is_fenced(n, i) for n, i in keys):
            await self.wait_changed()

    # ----- running fences ------------------------------------------------------------

    async def self_fenced_at_storage(self) -> bool:
        """Does any block server ban this node's current incarnation?"""
        if not self.config.storage or self.my_incarnation is None:
            return False
        try:
            client = _control_client()
        except ImportError:
            return False
        name, inc = self.config.node(self.my_id).name, f"{self.my_incarnation:x}"
        for server in self.config.storage:
            try:
                reply = await client.server_status(server.control, timeout=5.0)
            except Exception as exc:  # unreachable: it cannot tell us we lost
                log.info("node %d: cannot ask %s about our own fence: %s", self.my_id,
                         server.name, exc)  # fmt: skip
                continue
            entry = reply.get("fence_table", {}).get(name)
            if (
                entry
                and entry.get("admitted") != inc
                and (entry.get("fenced_all") or inc in entry.get("banned", []))
            ):
                return True
        return False

    async def attempt(self, case: FenceCase, method: FenceMethod) -> FenceRecord:
        node = self.config.node(case.node_id)
        timeout = method.timeout or self.config.timeouts.fence_timeout
        started = time.monotonic()
        try:
            if method.method == "storage":
                detail = await fence_at_storage(
                    self.config, case.node_id, case.incarnation, case.epoch, timeout
                )
            elif method.method == "agent":
                detail = await run_agent(method, node, timeout)
            else:
                log.critical(
                    "node %d: node %d needs MANUAL fencing: make sure it is off, then run "
                    "'gfspy fence-ack %d' on any member",
                    self.my_id,
                    case.node_id,
                    case.node_id,
                )
                with trio.fail_after(timeout):
                    when = await self.manual_acks.wait_for(case.node_id, case.failed_at)
                detail = f"acknowledged by operator at {time.ctime(when)}"
            ok = True
        except trio.TooSlowError:
            ok, detail = False, f"no manual acknowledgement within {timeout:g}s"
        except FenceError as exc:
            ok, detail = False, str(exc)
        rec = FenceRecord(
            time.time(),
            case.node_id,
            case.incarnation,
            case.epoch,
            method.method,
            ok,
            detail,
            self.my_id,
            time.monotonic() - started,
        )
        if ok:
            log.warning(
                "node %d: FENCED node %d incarnation %#x via %s: %s",
                self.my_id,
                case.node_id,
                case.incarnation,
                method.method,
                detail,
            )
        else:
            log.error(
                "node %d: fence of node %d via %s FAILED: %s",
                self.my_id,
                case.node_id,
                method.method,
                detail,
            )
        self.record(rec)
        return rec

    async def fence_until_done(self, case: FenceCase) -> None:
        """Try every level, round after round with backoff, until one succeeds."""
        t = self.config.timeouts
        case.actor = self.my_id
        if t.fence_delay and self.my_id != min(self.config.node_ids):
            # two_node fence race: the higher node waits so the lower one wins.
            log.info(
                "node %d: fence delay %gs before fencing node %d",
                self.my_id,
                t.fence_delay,
                case.node_id,
            )
            await trio.sleep(t.fence_delay)
            # The other side may have won the race meanwhile; then we are the one cut off
            # and must not fence back (two fenced nodes = no cluster at all).
            if await self.self_fenced_at_storage():
                raise SelfFenced(f"node {self.my_id} was fenced at the storage first")
        rounds = 0
        while not case.done:
            rounds += 1
            for method in self.config.node(case.node_id).fence:
                rec = await self.attempt(case, method)
                if rec.ok:
                    return
            delay = backoff_delay(rounds, t.fence_retry, t.fence_retry_max)
            log.error(
                "node %d: every fence method for node %d failed (round %d); retrying "
                "in %.1fs; recovery stays blocked: %s",
                self.my_id,
                case.node_id,
                rounds,
                delay,
                case.last_error,
            )
            await trio.sleep(delay)
