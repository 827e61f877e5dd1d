"""The node daemon: heartbeat + membership + quorum + fencing, driving DLM lockspaces.

One trio process per node. It wires the sans-IO parts together (failure detector,
membership, quorum), runs fences when it is the fence actor, drives the lockspaces
through `RecoveryDriver`, and answers a local admin endpoint (Unix socket, msgpack)
used by `gfspy status`, `gfspy lockdump` and `gfspy fence-ack`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any

import trio

from gfspy.cluster import admin_wire
from gfspy.cluster.config import DEFAULT_DLM_PORT, ClusterConfig, split_host_port
from gfspy.cluster.fencing import Fencer, SelfFenced
from gfspy.cluster.heartbeat import (
    FailureDetector,
    HeartbeatSocket,
    Packet,
    PeerFailed,
    PeerLate,
    PeerRestarted,
)
from gfspy.cluster.membership import (
    Action,
    ChangeBegan,
    Expelled,
    Membership,
    Send,
    ViewCommitted,
)
from gfspy.cluster.quorum import QuorumCalculator, QuorumStatus
from gfspy.cluster.recovery import EventJournal, Lockspace, RecoveryDriver

log = logging.getLogger(__name__)

EXIT_EXPELLED = 3


class DaemonError(Exception):
    """The daemon cannot go on safely (its state file cannot be written)."""


class Expulsion(Exception):
    """This incarnation was removed from the cluster; the process must end."""


class NodeDaemon:
    """One node's cluster daemon; `run()` until cancelled, `leave()` for a clean exit."""

    def __init__(
        self,
        config: ClusterConfig,
        node_id: int,
        incarnation: int,
        status_socket: str | None = None,
        lockspaces: list[str] | tuple[str, ...] = (),
        state_dir: str | None = None,
        key: bytes | None = None,
    ) -> None:
        self.config = config
        self.node = config.node(node_id)
        self.my_id = node_id
        self.incarnation = incarnation
        self.status_socket = status_socket
        self.quorum = QuorumCalculator(config)
        self.membership = Membership(config, node_id, incarnation, self.quorum)
        self.detector = FailureDetector(node_id, config.timeouts.failure_timeout)
        self.journal = EventJournal(node_id)
        self._journaled_fences: set[tuple[int, int]] = set()
        self.fencer = Fencer(
            config, node_id, on_change=self._wake_fencing, my_incarnation=incarnation
        )
        self.driver = RecoveryDriver(
            node_id, self.fencer, self.journal, self._local_quorate, self._quorum_event
        )
        self.socket = HeartbeatSocket(
            config.name,
            node_id,
            incarnation,
            self.node.heartbeat,
            {n.node_id: n.heartbeat for n in config.nodes if n.node_id != node_id},
            key=key,
        )
        self.state_file = (
            os.path.join(state_dir, f"{config.name}-node{node_id}.epoch") if state_dir else None
        )
        self._persisted_epoch = 0
        self._persist_lock = trio.Lock()
        self.lockspace_names = list(dict.fromkeys(lockspaces))
        self.lockspaces: dict[str, Any] = {}
        self.transport: Any = None
        self.expelled: str | None = None
        self.fence_problems: list[str] = []  # from the start-up self-test
        self.started_at = time.time()
        self._quorum_changed = trio.Event()
        self._fencing_wakeup = trio.Event()
        self._fence_tasks: set[tuple[int, int]] = set()
        self._admitted: set[tuple[int, int]] = set()
        self._last_quorate: bool | None = None
        self._nursery: trio.Nursery | None = None

    # ----- quorum helpers ------------------------------------------------------------

    def local_quorum(self) -> QuorumStatus:
        """Quorum of the members of our view that we still hear (our partition)."""
        if self.membership.view.epoch == 0:
            ids = [self.my_id, *self.membership.alive]
        else:
            ids = [m.node_id for m in self.membership.live_members()]
        return self.quorum.evaluate(ids, self.membership.witnesses_reachable)

    def _local_quorate(self) -> tuple[bool, str]:
        status = self.local_quorum()
        return status.quorate, status.reason

    def _quorum_event(self) -> trio.Event:
        return self._quorum_changed

    def _poke_quorum(self) -> None:
        status = self.local_quorum()
        if status.quorate != self._last_quorate:
            self._last_quorate = status.quorate
            if status.quorate:
                log.info(
                    "node %d: quorate (%d of %d votes)",
                    self.my_id,
                    status.votes,
                    status.expected_votes,
                )
            else:
                log.warning("node %d: NOT quorate: %s", self.my_id, status.reason)
                if self.membership.is_member and not self.driver.stopped:
                    self.driver.change_began(self.membership.view.epoch, "quorum lost")
        self._quorum_changed.set()
        self._quorum_changed = trio.Event()

    def _wake_fencing(self) -> None:
        self._fencing_wakeup.set()
        self._fencing_wakeup = trio.Event()
        self._update_join_gate()
        # Journal every confirmation the moment it is known (ours or learned from the
        # actor), whatever recovery pass is running: the order checks rely on it.
        for key, case in self.fencer.cases.items():
            if case.done and key not in self._journaled_fences:
                self._journaled_fences.add(key)
                self.journal.add(
                    "fence_confirmed",
                    self.membership.view.epoch,
                    f"node {case.node_id} incarnation {case.incarnation:#x} {case.confirmed_by}",
                )

    def _update_join_gate(self) -> None:
        # A pending startup fence must not keep out the very node it would be cancelled by.
        self.membership.fences_outstanding = any(not c.startup for c in self.fencer.outstanding())

    # ----- durable epoch ---------------------------------------------------------------

    def load_epoch(self) -> None:
        """Restore the highest epoch acked by earlier runs, so epochs never repeat."""
        if not self.state_file:
            return
        try:
            with open(self.state_file) as f:
                epoch = int(f.read().strip() or 0)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise OSError(f"{self.state_file}: unreadable state file: {exc}") from None
        self.membership.restore_epoch(epoch)
        self._persisted_epoch = epoch
        log.info("node %d: restored epoch %d from %s", self.my_id, epoch, self.state_file)

    async def _persist_epoch(self) -> None:
        """Make the highest acked epoch durable before any ack for it leaves this node."""
        if not self.state_file:
            return
        path = self.state_file
        async with self._persist_lock:  # one writer: the temporary file is shared
            epoch = self.membership.durable_epoch
            if epoch <= self._persisted_epoch:
                return

            def write() -> None:
                tmp = f"{path}.tmp"
                with open(tmp, "w") as f:
                    f.write(f"{epoch}\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)

            try:
                await trio.to_thread.run_sync(write)
            except OSError as exc:
                # Without a durable epoch this node could later ack an old epoch again.
                raise DaemonError(f"cannot record epoch {epoch} in {path}: {exc}") from None
            self._persisted_epoch = epoch

    # ----- lockspaces ----------------------------------------------------------------

    def add_lockspace(self, ls: Lockspace) -> None:
        self.lockspaces[ls.name] = ls
        self.driver.add_lockspace(ls)

    async def _open_lockspaces(self, nursery: trio.Nursery) -> None:
        """The DLM transport listens on the node's configured DLM address."""
        from gfspy.cluster.lockspaces import open_lockspace
        from gfspy.dlm.transport import Transport

        host, port = split_host_port(self.node.address, DEFAULT_DLM_PORT, "DLM address")
        self.transport = Transport(self.my_id, self.incarnation, host, port)
        await self.transport.start(nursery)
        for name in self.lockspace_names:
            self.add_lockspace(open_lockspace(name, self.transport, self.journal))

    # ----- main ----------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; raises Expulsion if this incarnation is removed."""
        await self.socket.open()
        log.info(
            "node %d (%s): incarnation %#x, heartbeat %s, cluster %s",
            self.my_id,
            self.node.name,
            self.incarnation,
            self.node.heartbeat,
            self.config.name,
        )
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self.driver.run)
                if self.lockspace_names:
                    await self._open_lockspaces(nursery)
                if self.status_socket:
                    await nursery.start(self._serve_admin, self.status_socket)
                nursery.start_soon(self.socket.receive_forever, self._on_packet)
                nursery.start_soon(self._heartbeat_loop)
                nursery.start_soon(self._tick_loop)
                nursery.start_soon(self._fence_manager)
                if self.config.quorum.witness:
                    nursery.start_soon(self._witness_loop)
                nursery.start_soon(self._fence_self_test)
                task_status.started()
        finally:
            self.socket.close()
            if self.status_socket:
                with contextlib.suppress(OSError):
                    os.unlink(self.status_socket)

    async def _heartbeat_loop(self) -> None:
        interval = self.config.timeouts.heartbeat_interval
        while True:
            body = {
                "m": self.membership.gossip(),
                "f": self.fencer.confirmations(),
                "a": [[n, w] for n, w in self.fencer.manual_acks.items()],
            }
            for peer in self.config.node_ids:
                if peer != self.my_id:
                    await self.socket.send(peer, "hb", body)
            await trio.sleep(interval)

    async def _tick_loop(self) -> None:
        interval = min(0.1, self.config.timeouts.heartbeat_interval / 2)
        last = trio.current_time()
        while True:
            now = trio.current_time()
            stall = now - last - interval
            last = now
            if stall > self.config.timeouts.heartbeat_interval:
                # Our own pauses look like dead peers to everyone else (reference §6.2):
                # say so well before the failure timeout is reached.
                log.warning(
                    "node %d: event loop stalled for %.2fs (failure timeout %.1fs)",
                    self.my_id, stall, self.config.timeouts.failure_timeout,
                )  # fmt: skip
            for ev in self.detector.check(now):
                if isinstance(ev, PeerLate):
                    log.warning(
                        "node %d: heartbeat from node %d late by %.2fs",
                        self.my_id,
                        ev.node_id,
                        ev.silent_for,
                    )
                elif isinstance(ev, PeerFailed):
                    log.error(
                        "node %d: node %d (incarnation %#x) FAILED: silent for %.2fs",
                        self.my_id,
                        ev.node_id,
                        ev.incarnation,
                        ev.silent_for,
                    )
                    await self._apply(
                        self.membership.peer_gone(
                            ev.node_id, ev.incarnation, "stopped heartbeating"
                        )
                    )
            self.quorum.note_alive([self.my_id, *self.membership.alive])
            if self.membership.is_member:
                self.quorum.observe_membership(
                    [m.node_id for m in self.membership.live_members()],
                    self.membership.witnesses_reachable,
                    now,
                )
            self._poke_quorum()
            # Stopped by a change that never became a view (a flapping witness, a healed
            # partition with nobody removed): ask for a fresh view of the same members so
            # every lockspace recovers together, instead of staying stopped for ever.
            self.membership.want_restart = bool(
                self.membership.is_member and self.driver.needs_view and self._last_quorate
            )
            await self._apply(self.membership.tick(now))
            await trio.sleep(interval)

    async def _on_packet(self, packet: Packet) -> None:
        if packet.sender not in self.config.node_ids:
            return
        now = trio.current_time()
        for ev in self.detector.heard(packet.sender, packet.incarnation, now):
            if isinstance(ev, PeerRestarted):
                log.error(
                    "node %d: node %d restarted (incarnation %#x -> %#x)",
                    self.my_id,
                    ev.node_id,
                    ev.old_incarnation,
                    ev.new_incarnation,
                )
                await self._apply(
                    self.membership.peer_gone(ev.node_id, ev.old_incarnation, "restarted")
                )
        await self._apply(self.membership.peer_alive(packet.sender, packet.incarnation))
        if packet.kind == "hb":
            body = packet.body
            for item in body.get("f", []):
                try:
                    node, inc, epoch, when, method, actor = item
                    self.fencer.learn_confirmation(
                        int(node), int(inc), int(epoch), float(when), str(method), int(actor)
                    )
                except (TypeError, ValueError):
                    continue
            for item in body.get("a", []):
                try:
                    self.fencer.manual_acks.add(int(item[0]), float(item[1]))
                except (TypeError, ValueError, IndexError):
                    continue
            gossip = body.get("m")
            if isinstance(gossip, dict):
                await self._apply(
                    self.membership.heard_gossip(packet.sender, packet.incarnation, gossip)
                )
        else:
            await self._apply(
                self.membership.receive(
                    packet.sender, packet.incarnation, packet.kind, packet.body, now
                )
            )

    async def _apply(self, actions: list[Action]) -> None:
        if actions:
            await self._persist_epoch()
        for action in actions:
            if isinstance(action, Send):
                await self.socket.send(action.node_id, action.kind, action.body)
            elif isinstance(action, ChangeBegan):
                self.driver.change_began(self.membership.view.epoch, action.reason)
            elif isinstance(action, ViewCommitted):
                self._on_view(action)
            elif isinstance(action, Expelled):
                self.expelled = action.reason
                self.journal.add("expelled", self.membership.view.epoch, action.reason)
                # Stop locking for good; the process then exits so that only a new
                # incarnation (through fencing and a fresh join) can come back.
                self.driver.change_began(self.membership.view.epoch, "expelled")
                await trio.sleep(0.2)
                raise Expulsion(action.reason)

    def _on_view(self, committed: ViewCommitted) -> None:
        view = committed.view
        now = time.time()
        # Members we have not heard yet (we just joined; their heartbeat is on its way)
        # count as heard now: they get a full failure timeout, not an instant removal.
        heard = self.detector.alive()
        for m in view.members:
            if m.node_id != self.my_id and m.node_id not in heard:
                self.detector.heard(m.node_id, m.incarnation, trio.current_time())
                self.membership.peer_alive(m.node_id, m.incarnation)
        for node_id, inc in committed.removed.items():
            self.fencer.need_fence(node_id, inc, view.epoch, now)
        if committed.founding:
            # Startup fencing: a configured node missing from a new cluster may still be
            # running with state from an earlier life (cut off, or never restarted).
            for node_id in self.config.node_ids:
                if view.member(node_id) is None:
                    self.fencer.need_fence(node_id, 0, view.epoch, now, startup=True)
        for node_id, inc in committed.joined.items():
            self.fencer.joined_cleanly(node_id, inc, view.epoch)
        self._update_join_gate()
        self.journal.add(
            "view_committed",
            view.epoch,
            f"members {list(view.member_ids)} removed {sorted(committed.removed)} "
            f"left {sorted(committed.left)} joined {sorted(committed.joined)}",
        )
        self.driver.view_committed(view)
        self._wake_fencing()

    async def leave(self) -> None:
        """Clean shutdown: stop locking, then tell the members we are gone for good, so
        they remove us without fencing (a node that just vanishes is fenced)."""
        if not self.membership.is_member or self._nursery is None:
            return
        epoch = self.membership.view.epoch
        self.journal.add("leaving", epoch, "clean shutdown")
        self.driver.change_began(epoch, "leaving the cluster")
        await self.driver.wait_stopped()
        for _ in range(3):  # datagrams: say it more than once
            await self._apply(self.membership.leave())
            await trio.sleep(0.1)

    # ----- fencing -------------------------------------------------------------------

    async def _fence_manager(self) -> None:
        """Start a fence task for every outstanding case while we are the fence actor."""
        assert self._nursery is not None
        while True:
            wakeup = self._fencing_wakeup
            view = self.membership.view
            actor = self.membership.is_member and view.epoch > 0 and view.low_node == self.my_id
            if actor and self.local_quorum().quorate:
                delay = self.config.timeouts.startup_fence_delay
                for case in self.fencer.outstanding():
                    key = (case.node_id, case.incarnation)
                    if case.startup and time.time() - case.failed_at < delay:
                        continue  # give a slow-booting node its chance to join cleanly
                    if key not in self._fence_tasks:
                        self._fence_tasks.add(key)
                        self._nursery.start_soon(self._fence_task, case)
                for n, inc in self._joined_needing_admit(view):
                    self._admitted.add((n, inc))
                    self._nursery.start_soon(self._admit, n, inc, view.epoch)
            with trio.move_on_after(1.0):
                await wakeup.wait()

    async def _fence_task(self, case: Any) -> None:
        try:
            await self.fencer.fence_until_done(case)
        except SelfFenced as exc:
            await self._apply([Expelled(str(exc))])
        finally:
            self._fence_tasks.discard((case.node_id, case.incarnation))

    def _joined_needing_admit(self, view: Any) -> list[tuple[int, int]]:
        if not self.config.storage:
            return []
        # A node's new incarnation is admitted only once its old one is fenced, so the
        # ADMIT can never race with (or undo) the FENCE at the block server.
        fencing = {c.node_id for c in self.fencer.outstanding()}
        return [
            (m.node_id, m.incarnation)
            for m in view.members
            if (m.node_id, m.incarnation) not in self._admitted and m.node_id not in fencing
        ]

    async def _admit(self, node_id: int, incarnation: int, epoch: int) -> None:
        """Unfence: admit a member's current incarnation at every block server.

        Idempotent at the server; a server that refuses or cannot be reached is retried
        by the fence manager (about once a second) until it accepts, since a member that
        is not admitted cannot reach the storage."""
        from gfspy.blockd import control_client

        name = self.config.node(node_id).name
        missing: list[str] = []
        for server in self.config.storage:
            try:
                reply = await control_client.admit_node(
                    server.control, name, incarnation, epoch, timeout=10.0
                )
                if reply.get("status") == "OK":
                    continue
                why = reply.get("reason", reply)
            except control_client.ControlError as exc:
                why = str(exc)
            missing.append(server.name)
            log.warning("node %d: ADMIT node %d (%#x) at %s failed: %s", self.my_id, node_id,
                        incarnation, server.name, why)  # fmt: skip
        if missing:
            self._admitted.discard((node_id, incarnation))  # the manager tries again

    async def _fence_self_test(self) -> None:
        """Check the fence paths at start, so a broken one is found before it is needed
        (a fence that cannot work hangs the whole cluster at the next failure)."""
        problems: list[str] = []
        commands = {f.command for n in self.config.nodes for f in n.fence if f.method == "agent"}
        for command in sorted(commands):
            if not os.access(command, os.X_OK):
                problems.append(f"fence agent {command} is not an executable file")
        if any(f.method == "storage" for n in self.config.nodes for f in n.fence):
            from gfspy.blockd import control_client

            for server in self.config.storage:
                try:
                    await control_client.server_status(server.control, timeout=10.0)
                except control_client.ControlError as exc:
                    problems.append(f"block server {server.name} control channel: {exc}")
        for problem in problems:
            log.error("node %d: fence self-test: %s", self.my_id, problem)
        self.fence_problems = problems

    async def _witness_loop(self) -> None:
        from gfspy.blockd import control_client

        period = max(1.0, self.config.timeouts.heartbeat_interval * 2)
        while True:
            reachable = 0
            for server in self.config.storage:
                try:
                    reply = await control_client.server_status(server.control, timeout=period)
                    reachable += reply.get("status") == "OK"
                except control_client.ControlError:
                    pass
            if reachable != self.membership.witnesses_reachable:
                log.info(
                    "node %d: %d of %d block servers reachable (witness votes)",
                    self.my_id,
                    reachable,
                    len(self.config.storage),
                )
            self.membership.witnesses_reachable = reachable
            await trio.sleep(period)

    # ----- admin endpoint ------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Everything `gfspy status` shows, as plain msgpack-able data."""
        view = self.membership.view
        alive = self.membership.alive
        q = self.local_quorum()
        return {
            "ok": True,
            "cluster": self.config.name,
            "node_id": self.my_id,
            "name": self.node.name,
            "incarnation": self.incarnation,
            "pid": os.getpid(),
            "state": "expelled"
            if self.expelled
            else ("member" if self.membership.is_member else "joining"),
            "expelled": self.expelled or "",
            "epoch": view.epoch,
            "members": [
                {
                    "id": m.node_id,
                    "name": self.config.node(m.node_id).name,
                    "incarnation": m.incarnation,
                    "address": m.address,
                    "alive": m.node_id == self.my_id or alive.get(m.node_id) == m.incarnation,
                }
                for m in view.members
            ],
            "heard": sorted(alive),
            "heartbeat_rejected": self.socket.rejected,
            "quorum": q.as_dict(),
            "recovery": {
                "stopped": self.driver.stopped,
                "started_epoch": self.driver.started_epoch,
                "waiting_for": self.driver.waiting_for,
            },
            "fences": [c.as_dict() for c in self.fencer.cases.values()],
            "fence_self_test": self.fence_problems,
            "fence_history": [r.as_dict() for r in self.fencer.history],
            "manual_acks": [[n, w] for n, w in self.fencer.manual_acks.items()],
            "events": [e.as_dict() for e in self.journal.events],
            "lockspaces": sorted(self.lockspaces),
        }

    async def _serve_admin(self, path: str, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(path)
        os.chmod(path, 0o600)  # the admin endpoint can acknowledge fences: root only
        sock.listen(16)
        listener = trio.SocketListener(sock)
        task_status.started()
        await trio.serve_listeners(self._admin_connection, [listener])

    async def _admin_connection(self, stream: trio.SocketStream) -> None:
        decoder = admin_wire.Decoder()
        async with stream:
            try:
                while True:
                    request = decoder.next()
                    if request is None:
                        data = await stream.receive_some(65536)
                        if not data:
                            return
                        decoder.feed(data)
                        continue
                    answer = await self.admin_request(request)
                    await stream.send_all(admin_wire.encode(answer))
            except (admin_wire.AdminWireError, trio.BrokenResourceError) as exc:
                log.debug("node %d: admin connection dropped: %s", self.my_id, exc)

    async def admin_request(self, request: dict[str, Any]) -> dict[str, Any]:
        """Answer one admin request; errors become `ok: False` answers, never exceptions."""
        op = request.get("op")
        try:
            if op == "status":
                return self.status()
            if op == "fence_ack":
                return self._fence_ack(request.get("node"))
            if op in ("lockdump", "lock", "convert", "unlock", "locks"):
                name = request.get("lockspace")
                ls = self.lockspaces.get(name) if isinstance(name, str) else None
                if ls is None:
                    return {"ok": False, "error": f"no lockspace {name!r} on node {self.my_id}"}
                handler = getattr(ls, f"admin_{op}", None)
                if handler is None:
                    return {"ok": False, "error": f"lockspace {name} does not support {op}"}
                return {"ok": True, **await handler(request)}
        except KeyError as exc:
            return {"ok": False, "error": f"{op}: missing argument {exc}"}
        except (TypeError, ValueError, OSError) as exc:
            return {"ok": False, "error": f"{op}: {exc}"}
        return {"ok": False, "error": f"unknown op {op!r}"}

    def _fence_ack(self, node: Any) -> dict[str, Any]:
        by_name = {n.name: n.node_id for n in self.config.nodes}
        if isinstance(node, str) and node in by_name:
            node = by_name[node]
        elif isinstance(node, str) and node.isdigit():
            node = int(node)
        if not isinstance(node, int) or node not in self.config.node_ids:
            return {"ok": False, "error": f"no node {node!r} in cluster {self.config.name}"}
        if node == self.my_id:
            return {"ok": False, "error": "a node cannot acknowledge its own fence"}
        self.fencer.manual_acks.add(node)
        self._wake_fencing()
        waiting = [c.as_dict() for c in self.fencer.outstanding() if c.node_id == node]
        log.warning("node %d: operator acknowledged that node %d is fenced", self.my_id, node)
        return {"ok": True, "node": node, "pending": waiting}
