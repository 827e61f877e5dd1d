"""One device over several NBD servers exporting the same LUN, with dm-multipath's rules.

Paths are grouped (`failover`: one path per group, in URI order of priority; `multibus`:
all paths in one group; a path selector spreads requests over a group: round-robin with
`rr_min_io`, queue-length or service-time). A checker probes every path each
`polling_interval`, fails dead ones and reinstates live ones after re-checking their
identity; failback is immediate, manual, or deferred by N seconds. With no usable path,
requests queue for at most `no_path_retry` intervals, then fail with EIO.

Errors are classified (reference §3.7 rule 6): EPERM means this node is fenced, so the
device fails everything at once and never retries on another path; EINVAL, ENOSPC and
the like go back to the caller; disconnects, timeouts, protocol errors and EIO fail the
path and the request is retried elsewhere.

In-doubt writes (§3.7), the rule implemented here:

* A WRITE, WRITE_ZEROES, TRIM or FLUSH whose session broke after it may have been sent
  is *in doubt*: the old server may still execute it later.
* From that moment every new mutating request waits (reads continue on other paths).
* The old session must be *quiesced* before anything is reissued, in this order:
  SESSION_FENCE through the control channel of that path's server (`?control=` in the
  URI) confirmed, or the server listing no session for our connection any more (it
  keeps a session listed until its backend I/O has returned); or the server confirmed
  gone: its control port (or, without a control channel, its NBD port) refuses
  connections; or the cluster manager confirms it fenced that server (the optional
  `fence_server` hook, asked once the control channel fails to answer); or, only if
  configured, `request_lifetime_bound` seconds have passed.
* Then the in-doubt requests are reissued on a healthy path in their original order,
  and only then are waiting writes released.
* If no guarantee comes within `quiesce_timeout`, the in-doubt requests fail with EIO
  and every later write fails with EIO too: a stale copy could still land, so the
  device stops writing rather than risk overwriting newer data.
"""

from __future__ import annotations

import errno
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from gfspy.blockdev.device import DeviceError
from gfspy.blockdev.nbd import ExportProperties, SubmittingDevice, check_properties
from gfspy.blockdev.nbd_session import (
    MUTATING,
    ClientIdentity,
    FencedError,
    NbdConnection,
    NbdTarget,
    PathError,
    default_identity,
    export_name_for,
    parse_nbd_uri,
)
from gfspy.blockdev.quiesce import FenceServerHook, obtain_quiesce_guarantee
from gfspy.nbd.wire import Cmd

log = logging.getLogger(__name__)

POLICIES = ("failover", "multibus")
SELECTORS = ("round-robin", "queue-length", "service-time")


@dataclass(frozen=True)
class MultipathConfig:
    """The multipath knobs, named as in multipath.conf so cluster.toml can feed them."""

    policy: str = "failover"
    #: How a group picks a path per request: "round-robin" (rr_min_io at a time),
    #: "queue-length" (fewest requests in flight) or "service-time" (fewest bytes).
    path_selector: str = "round-robin"
    #: Requests sent down one path before round-robin moves on (multibus).
    rr_min_io: int = 16
    #: Seconds between path checks.
    polling_interval: float = 5.0
    #: "immediate", "manual", or a number of seconds a path must be up before failback.
    failback: str | float = "manual"
    #: Checker intervals to queue I/O with no usable path; 0 fails at once. Never forever.
    no_path_retry: int = 6
    #: Seconds a request may wait for its reply before its session is declared dead.
    io_timeout: float = 30.0
    #: Deadline of one checker probe; defaults to polling_interval.
    checker_timeout: float | None = None
    connect_timeout: float = 10.0
    #: How long to try for a quiesce guarantee before failing in-doubt writes.
    quiesce_timeout: float = 60.0
    #: Opt-in §3.7 rule 3(c): a declared upper bound on a request's life inside a server.
    request_lifetime_bound: float | None = None
    #: Opt-in §3.8 content check: the offset of a block that never changes once made
    #: (65536, GFS2's superblock with its UUID); every path must read the same bytes
    #: there, at open and on reinstatement, which catches one WWID given to two LUNs.
    recheck_offset: int | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, not {self.policy!r}")
        if self.path_selector not in SELECTORS:
            raise ValueError(f"path_selector must be one of {', '.join(SELECTORS)}")
        if self.rr_min_io < 1:
            raise ValueError("rr_min_io must be at least 1")
        if self.polling_interval <= 0 or self.io_timeout <= 0:
            raise ValueError("polling_interval and io_timeout must be positive")
        if self.recheck_offset is not None and self.recheck_offset < 0:
            raise ValueError("recheck_offset must be >= 0")
        if self.no_path_retry < 0:
            raise ValueError("no_path_retry must be >= 0 (queueing forever is not offered)")
        if isinstance(self.failback, str):
            if self.failback not in ("immediate", "manual"):
                raise ValueError("failback must be 'immediate', 'manual' or seconds")
        elif self.failback < 0:
            raise ValueError("failback seconds must be >= 0")

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> MultipathConfig:
        """Build from a cluster.toml table; unknown keys are an error, not ignored."""
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown multipath settings: {', '.join(sorted(unknown))}")
        return cls(**values)

    @property
    def probe_timeout(self) -> float:
        return self.checker_timeout or self.polling_interval


class PathState:
    ACTIVE = "active"
    FAILED = "failed"
    FENCED = "fenced"


@dataclass(eq=False)
class Path:
    """One server's view of the map, with dm-multipath style state."""

    target: NbdTarget
    group: int
    conn: NbdConnection | None = None
    state: str = PathState.FAILED
    reason: str = "not connected"
    ready_since: float = 0.0
    requests: int = 0
    bytes: int = 0
    failures: int = 0

    @property
    def usable(self) -> bool:
        return self.state == PathState.ACTIVE and self.conn is not None and not self.conn.broken


@dataclass(eq=False)
class _Request:
    seq: int
    command: Cmd
    offset: int
    length: int
    flags: int
    payload: Any


@dataclass(eq=False)
class _Quiesce:
    """The in-doubt requests of one broken session, reissued in order once it is drained."""

    path: Path
    conn: NbdConnection
    members: dict[int, _Request] = field(default_factory=dict)
    outcomes: dict[int, BaseException | bytes] = field(default_factory=dict)
    done: trio.Event = field(default_factory=trio.Event)


class MultipathDevice(SubmittingDevice):
    """A `Device` over several paths to one LUN (see the module docstring for the rules)."""

    def __init__(
        self,
        paths: list[Path],
        props: ExportProperties,
        config: MultipathConfig,
        *,
        readonly: bool,
        identity: ClientIdentity | None,
        on_fenced: Callable[[str], None] | None = None,
        fence_server: FenceServerHook | None = None,
        fingerprint: bytes | None = None,
    ) -> None:
        self.paths = paths
        self.fingerprint = fingerprint
        self.fence_server = fence_server
        self.props = props
        self.config = config
        self.size = props.size
        self.block_size = props.block_size
        self.readonly = readonly
        self.uris = [p.target.uri for p in paths]
        self.name = f"mpath[{props.wwid or paths[0].target.server}]"
        self.identity = identity
        self.on_fenced = on_fenced
        if config.policy == "multibus":
            self.groups = [paths]
        else:
            self.groups = [[p] for p in paths]
        self.active_group = 0
        self.fenced: str | None = None
        self.write_poison: str | None = None
        self._seq = itertools.count()
        self._changed = trio.Event()
        self._no_path_since: float | None = None
        self._rr_path: Path | None = None
        self._rr_count = 0
        self._outstanding: dict[NbdConnection, dict[int, _Request]] = {}
        self._quiesces: dict[NbdConnection, _Quiesce] = {}
        self._gate_closed = 0
        self._checker_scope = trio.CancelScope()
        self._closed = False
        self._pick_group(initial=True)

    # ---- opening --------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        uris: list[str],
        config: MultipathConfig | None = None,
        *,
        readonly: bool = False,
        identity: ClientIdentity | None = None,
        on_fenced: Callable[[str], None] | None = None,
        fence_server: FenceServerHook | None = None,
    ) -> MultipathDevice:
        """Connect every path; paths that fail now are retried by the checker."""
        config = config or MultipathConfig()
        try:
            targets = [parse_nbd_uri(u) for u in uris]
        except ValueError as e:
            raise DeviceError(errno.EINVAL, str(e)) from None
        if not targets:
            raise DeviceError(errno.EINVAL, "no paths given")
        identity = identity or default_identity(targets[0])
        paths = [Path(t, group=i) for i, t in enumerate(targets)]
        errors: dict[int, DeviceError] = {}

        async def connect(i: int, path: Path) -> None:
            try:
                path.conn = await NbdConnection.connect(
                    path.target,
                    export_name_for(path.target, identity),
                    timeout=config.connect_timeout,
                )
            except DeviceError as e:
                errors[i] = e
                path.reason = e.strerror or str(e)

        async with trio.open_nursery() as nursery:
            for i, path in enumerate(paths):
                nursery.start_soon(connect, i, path)
        connected = [p for p in paths if p.conn is not None]
        try:
            fenced = [e for e in errors.values() if isinstance(e, FencedError)]
            if fenced:
                raise fenced[0]
            if not connected:
                first = errors[min(errors)]
                raise DeviceError(first.errno or errno.EIO, f"no path could be opened: {first}")
            props = ExportProperties.of(connected[0].conn.negotiated)  # type: ignore[union-attr]
            check_properties(connected[0].target, props, readonly)
            for path in connected[1:]:
                other = ExportProperties.of(path.conn.negotiated)  # type: ignore[union-attr]
                if not other.same_device(props):
                    raise DeviceError(
                        errno.EINVAL,
                        f"{path.target.uri} is not the same device as "
                        f"{connected[0].target.uri}: {other.describe()} != {props.describe()}",
                    )
            fingerprint = await _read_fingerprint(connected, props, config)
        except BaseException:
            for path in connected:
                await path.conn.aclose()  # type: ignore[union-attr]
            raise
        now = trio.current_time()
        for path in connected:
            path.state, path.reason, path.ready_since = PathState.ACTIVE, "", now
        device = cls(
            paths,
            props,
            config,
            fingerprint=fingerprint,
            readonly=readonly,
            identity=identity,
            on_fenced=on_fenced,
            fence_server=fence_server,
        )
        for path in connected:
            device._watch(path)
        trio.lowlevel.spawn_system_task(device._checker, name=f"multipath checker {device.name}")
        return device

    # ---- path choice --------------------------------------------------------------

    def _pick_group(self, *, initial: bool = False) -> int | None:
        """Keep the active group while it has a usable path, else the best one that does."""
        if any(p.usable for p in self.groups[self.active_group]):
            return self.active_group
        for index, group in enumerate(self.groups):
            if any(p.usable for p in group):
                if not initial:
                    log.warning("%s: switching to path group %d", self.name, index)
                self.active_group = index
                return index
        return None

    def _pick_path(self) -> Path | None:
        group = self._pick_group()
        if group is None:
            return None
        usable = [p for p in self.groups[group] if p.usable]
        selector = self.config.path_selector
        if selector != "round-robin" and len(usable) > 1:
            # Least loaded path; the rotation breaks ties so idle paths share the work.
            start = (
                (usable.index(self._rr_path) + 1) % len(usable) if self._rr_path in usable else 0
            )
            rotated = usable[start:] + usable[:start]
            if selector == "queue-length":
                nxt = min(rotated, key=lambda p: p.conn.inflight)  # type: ignore[union-attr]
            else:  # service-time: outstanding bytes (equal throughput assumed)
                nxt = min(rotated, key=lambda p: p.conn.inflight_bytes)  # type: ignore[union-attr]
            self._rr_path = nxt
            return nxt
        if self._rr_path in usable and self._rr_count < self.config.rr_min_io:
            self._rr_count += 1
            return self._rr_path
        if self._rr_path in usable:
            nxt = usable[(usable.index(self._rr_path) + 1) % len(usable)]
        else:
            nxt = usable[0]
        self._rr_path, self._rr_count = nxt, 1
        return nxt

    async def _choose_path(self) -> Path:
        """A usable path, queueing at most no_path_retry checker intervals for one."""
        while True:
            self._check_fenced()
            path = self._pick_path()
            if path is not None:
                self._no_path_since = None
                return path
            now = trio.current_time()
            if self._no_path_since is None:
                self._no_path_since = now
                log.error("%s: no usable path; queueing I/O", self.name)
            deadline = (
                self._no_path_since + self.config.no_path_retry * self.config.polling_interval
            )
            if now >= deadline:
                raise DeviceError(
                    errno.EIO,
                    f"{self.name}: no usable path (queued {self.config.no_path_retry} "
                    f"checker intervals)",
                )
            with trio.move_on_at(deadline):
                await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _check_fenced(self) -> None:
        if self.fenced is not None:
            raise FencedError(f"{self.name}: this node is fenced ({self.fenced})")
        if self._closed:
            raise DeviceError(errno.EBADF, f"{self.name}: device is closed")

    # ---- path state changes -------------------------------------------------------

    def _fail_path(self, path: Path, conn: NbdConnection, why: str) -> None:
        if path.conn is conn and path.state == PathState.ACTIVE:
            path.state, path.reason = PathState.FAILED, why
            path.failures += 1
            log.warning("%s: path %s failed: %s", self.name, path.target.server, why)
            self._pick_group()
            self._notify()

    def _watch(self, path: Path) -> None:
        """Fail the path as soon as its session dies, even with no request in flight."""
        assert path.conn is not None

        def failed(conn: NbdConnection, failure: PathError | FencedError) -> None:
            if not isinstance(failure, FencedError):
                self._fail_path(path, conn, failure.strerror or "session failed")

        path.conn.on_failure = failed

    def _self_fence(self, path: Path, why: str) -> None:
        """EPERM: stop everything on every path; the node must not write any more."""
        if self.fenced is not None:
            return
        self.fenced = why
        path.state, path.reason = PathState.FENCED, why
        log.critical("%s: FENCED by %s: %s; failing all I/O", self.name, path.target.server, why)
        self._checker_scope.cancel()
        for other in self.paths:
            if other.conn is not None:
                other.conn._fail(FencedError(why))
        self._notify()
        if self.on_fenced is not None:
            try:
                self.on_fenced(why)
            except Exception:
                log.exception("%s: on_fenced callback failed", self.name)

    # ---- requests -----------------------------------------------------------------

    async def _submit(
        self, command: Cmd, offset: int, length: int, *, flags: int = 0, payload: Any = None
    ) -> bytes:
        request = _Request(next(self._seq), command, offset, length, flags, payload)
        return await self._execute(request, reissue=False)

    async def _execute(self, request: _Request, *, reissue: bool) -> bytes:
        mutating = request.command in MUTATING
        while True:
            self._check_fenced()
            if mutating:
                if self.write_poison is not None:
                    raise DeviceError(
                        errno.EIO, f"{self.name}: writes stopped: {self.write_poison}"
                    )
                if not reissue:
                    await self._wait_gate_open()
            path = await self._choose_path()
            conn = path.conn
            assert conn is not None
            outstanding = self._outstanding.setdefault(conn, {})
            outstanding[request.seq] = request
            path.requests += 1
            path.bytes += request.length
            joined: _Quiesce | None = None
            try:
                return await conn.submit(
                    request.command,
                    request.offset,
                    request.length,
                    flags=request.flags,
                    payload=request.payload,
                    timeout=self.config.io_timeout,
                )
            except FencedError as e:
                self._self_fence(path, e.strerror or "EPERM")
                raise
            except PathError as e:
                if self.fenced is not None:
                    raise FencedError(f"{self.name}: this node is fenced ({self.fenced})") from None
                self._fail_path(path, conn, e.strerror or "path error")
                if not (mutating and e.sent):
                    continue  # a read, or never reached the server: just go elsewhere
                joined = self._join_quiesce(path, conn, request)
            finally:
                outstanding.pop(request.seq, None)
                if not outstanding:
                    self._outstanding.pop(conn, None)
            await joined.done.wait()
            outcome = joined.outcomes[request.seq]
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome

    def _join_quiesce(self, path: Path, conn: NbdConnection, request: _Request) -> _Quiesce:
        quiesce = self._quiesces.get(conn)
        if quiesce is None:
            quiesce = _Quiesce(path, conn)
            self._quiesces[conn] = quiesce
            self._gate_closed += 1
            log.warning(
                "%s: writes in doubt on %s; holding writes until that session is drained",
                self.name,
                path.target.server,
            )
            trio.lowlevel.spawn_system_task(self._run_quiesce, quiesce, name="multipath quiesce")
        if request.payload is not None and not isinstance(request.payload, bytes):
            # Pin the data now: a caller that gives up must not change what is reissued.
            request.payload = bytes(request.payload)
        quiesce.members[request.seq] = request
        return quiesce

    async def _wait_gate_open(self) -> None:
        while self._gate_closed:
            await self._changed.wait()

    async def _run_quiesce(self, quiesce: _Quiesce) -> None:
        """Obtain the drain guarantee, then reissue the in-doubt requests in order."""
        try:
            # Every waiter of the broken session was woken at once; let them all join.
            for _ in range(200):
                if all(s in quiesce.members for s in self._outstanding.get(quiesce.conn, {})):
                    break
                await trio.sleep(0.005)
            how = await obtain_quiesce_guarantee(
                quiesce.path.target,
                quiesce.conn.session_id,
                quiesce.conn.local_address,
                control_tls=quiesce.conn.tls_context,
                fence_server=self.fence_server,
                control_timeout=max(2.0, self.config.probe_timeout),
                timeout=self.config.quiesce_timeout,
                retry_interval=min(1.0, self.config.polling_interval),
                lifetime_bound=self.config.request_lifetime_bound,
                is_fenced=lambda: self.fenced is not None,
            )
            if how is None:
                self.write_poison = (
                    f"writes in doubt on {quiesce.path.target.server} and no drain "
                    f"confirmation within {self.config.quiesce_timeout:g}s"
                )
                log.critical("%s: %s", self.name, self.write_poison)
            else:
                log.warning(
                    "%s: session on %s quiesced (%s); reissuing %d request(s)",
                    self.name,
                    quiesce.path.target.server,
                    how,
                    len(quiesce.members),
                )
            for seq in sorted(quiesce.members):
                member = quiesce.members[seq]
                if how is None:
                    quiesce.outcomes[seq] = DeviceError(
                        errno.EIO, f"{self.name}: {self.write_poison}"
                    )
                    continue
                try:
                    quiesce.outcomes[seq] = await self._execute(member, reissue=True)
                except DeviceError as e:
                    quiesce.outcomes[seq] = e
        except trio.Cancelled:
            for seq in quiesce.members:
                quiesce.outcomes.setdefault(seq, DeviceError(errno.EIO, f"{self.name}: closed"))
            raise
        except Exception as e:  # a system task must not crash the run
            log.exception("%s: quiesce failed", self.name)
            for seq in quiesce.members:
                quiesce.outcomes.setdefault(seq, DeviceError(errno.EIO, f"quiesce failed: {e}"))
        finally:
            del self._quiesces[quiesce.conn]
            self._gate_closed -= 1
            quiesce.done.set()
            self._notify()

    # ---- checker and failback -----------------------------------------------------

    async def _checker(self) -> None:
        with self._checker_scope:
            while True:
                await trio.sleep(self.config.polling_interval)
                try:
                    await self.check_paths()
                except Exception:  # a system task must not crash the run; keep checking
                    log.exception("%s: path checker round failed", self.name)

    async def check_paths(self) -> None:
        """One checker round: probe active paths, try to reinstate failed ones, failback."""
        async with trio.open_nursery() as nursery:
            for path in self.paths:
                nursery.start_soon(self._check_one, path)
        self._maybe_failback()

    async def _check_one(self, path: Path) -> None:
        if self.fenced is not None or self._closed or path.state == PathState.FENCED:
            return
        if path.usable:
            assert path.conn is not None
            conn = path.conn
            try:
                await conn.submit(Cmd.READ, 0, self.block_size, timeout=self.config.probe_timeout)
            except FencedError as e:
                self._self_fence(path, e.strerror or "EPERM")
            except PathError as e:
                self._fail_path(path, conn, f"checker: {e.strerror}")
            except DeviceError as e:
                log.warning("%s: checker read on %s: %s", self.name, path.target.server, e)
            return
        await self._reinstate(path)

    async def _reinstate(self, path: Path) -> None:
        try:
            conn = await NbdConnection.connect(
                path.target,
                export_name_for(path.target, self.identity),
                timeout=min(self.config.connect_timeout, self.config.polling_interval),
            )
        except FencedError as e:
            self._self_fence(path, e.strerror or "EPERM")
            return
        except DeviceError as e:
            path.reason = e.strerror or str(e)
            return
        props = ExportProperties.of(conn.negotiated)
        if not props.same_device(self.props):
            reason = f"identity changed ({props.describe()}); refused"
            if path.reason != reason:
                log.error("%s: path %s refused: %s", self.name, path.target.server, reason)
            path.reason = reason
            await conn.aclose()
            return
        if self.fingerprint is not None and self.config.recheck_offset is not None:
            try:
                content = await conn.submit(
                    Cmd.READ,
                    self.config.recheck_offset,
                    self.block_size,
                    timeout=self.config.probe_timeout,
                )
            except DeviceError as e:
                path.reason = f"recheck read failed: {e.strerror}"
                await conn.aclose()
                return
            if content != self.fingerprint:
                reason = f"content at {self.config.recheck_offset} differs: another LUN; refused"
                if path.reason != reason:
                    log.error("%s: path %s refused: %s", self.name, path.target.server, reason)
                path.reason = reason
                await conn.aclose()
                return
        if self._closed or self.fenced is not None:
            await conn.aclose()
            return
        old = path.conn
        path.conn, path.state, path.reason = conn, PathState.ACTIVE, ""
        path.ready_since = trio.current_time()
        self._watch(path)
        log.warning("%s: path %s reinstated", self.name, path.target.server)
        if old is not None and old is not conn:
            await old.aclose()
        self._pick_group()
        self._notify()

    def _maybe_failback(self) -> None:
        failback = self.config.failback
        if failback == "manual":
            return
        now = trio.current_time()
        for index in range(self.active_group):
            ready = [p for p in self.groups[index] if p.usable]
            if not ready:
                continue
            up_for = now - min(p.ready_since for p in ready)
            if failback == "immediate" or up_for >= float(failback):
                self.switch_group(index)
                return

    def switch_group(self, index: int) -> None:
        """Make group `index` active (failback, or an operator's manual switch)."""
        if not 0 <= index < len(self.groups):
            raise ValueError(f"no path group {index}")
        if not any(p.usable for p in self.groups[index]):
            raise DeviceError(errno.EIO, f"{self.name}: path group {index} has no usable path")
        if index != self.active_group:
            log.warning("%s: failback to path group %d", self.name, index)
            self.active_group = index
            self._notify()

    # ---- status and teardown ------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What `gfspy paths` prints: groups, paths and their states."""
        return {
            "name": self.name,
            "wwid": self.props.wwid,
            "size": self.size,
            "block_size": self.block_size,
            "policy": self.config.policy,
            "path_selector": self.config.path_selector,
            "failback": self.config.failback,
            "no_path_retry": self.config.no_path_retry,
            "fenced": self.fenced,
            "write_poison": self.write_poison,
            "groups": [
                {
                    "index": i,
                    "status": _group_status(i, group, self.active_group),
                    "paths": [
                        {
                            "uri": p.target.uri,
                            "server": p.target.server,
                            "state": p.state,
                            "ready": p.usable,
                            "reason": p.reason,
                            "requests": p.requests,
                            "bytes": p.bytes,
                            "failures": p.failures,
                            "inflight": p.conn.inflight if p.conn is not None else 0,
                        }
                        for p in group
                    ],
                }
                for i, group in enumerate(self.groups)
            ],
        }

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._checker_scope.cancel()
        self._notify()
        for path in self.paths:
            if path.conn is not None:
                await path.conn.aclose()


def _group_status(index: int, group: list[Path], active: int) -> str:
    if not any(p.usable for p in group):
        return "failed"
    return "active" if index == active else "enabled"


async def _read_fingerprint(
    connected: list[Path], props: ExportProperties, config: MultipathConfig
) -> bytes | None:
    """Read the recheck block through every path; they must all agree (§3.8)."""
    if config.recheck_offset is None:
        return None
    offset = config.recheck_offset
    if offset % props.block_size or offset + props.block_size > props.size:
        raise DeviceError(errno.EINVAL, f"recheck_offset {offset} is not a block of the device")
    first: bytes | None = None
    for path in connected:
        assert path.conn is not None
        content = await path.conn.submit(
            Cmd.READ, offset, props.block_size, timeout=config.io_timeout
        )
        if first is None:
            first = content
        elif content != first:
            raise DeviceError(
                errno.EINVAL,
                f"{path.target.uri} reads different content at {offset} than "
                f"{connected[0].target.uri}: not the same device despite the same WWID",
            )
    return first
