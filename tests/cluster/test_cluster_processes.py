"""Node daemons as real processes on their own loopback addresses, fenced through real
gfspy-blockd servers or a fence agent, killed with SIGKILL."""

from __future__ import annotations

import re
import secrets
import signal
import subprocess
import sys

import pytest

from .harness import (
    BlockServer,
    Cluster,
    agent_calls,
    events,
    fences,
    wait_for,
    write_agent,
)


@pytest.fixture
def closing():
    started: list = []
    yield started.append
    for thing in reversed(started):
        thing.close()


def assert_fenced_before_recovery(status: dict, victim: int) -> None:
    """The order on this node: locking stopped, the view removing `victim` agreed, its
    fence confirmed, and only then any lockspace started again."""
    ev = status["events"]
    removal = next(
        e for e in ev
        if e["kind"] == "view_committed"
        and str(victim) in re.search(r"removed \[([^\]]*)\]", e["detail"]).group(1).split(", ")
    )  # fmt: skip
    fenced = next(
        e
        for e in ev
        if e["kind"] == "fence_confirmed" and e["detail"].startswith(f"node {victim} ")
    )
    starts = [e for e in ev if e["kind"] == "ls_start" and e["seq"] > removal["seq"]]
    assert starts, "no recovery after the view change"
    assert all(e["seq"] > fenced["seq"] for e in starts), ev
    assert any(
        e["kind"] == "quorum_ok" and removal["seq"] < e["seq"] < starts[0]["seq"] for e in ev
    )
    assert any(e["kind"] == "running" and e["seq"] > fenced["seq"] for e in ev)
    # Locking was already stopped when the view was agreed, and stayed so until the start.
    before = [
        e["kind"] for e in ev[: ev.index(removal)] if e["kind"] in ("ls_stopped", "ls_started")
    ]
    assert before[-1] == "ls_stopped"


@pytest.mark.timeout(90)
def test_sigkill_storage_fence_at_every_blockd_then_recovery(tmp_path, closing):
    servers = [BlockServer(tmp_path / f"b{i}", name=f"b{i}") for i in (1, 2)]
    for s in servers:
        closing(s)
    cluster = Cluster(tmp_path, 4, fence=[{"method": "storage"}], storage=servers)
    closing(cluster)
    cluster.start_all()
    first = cluster.wait_view([1, 2, 3, 4], [1, 2, 3, 4])
    victim_inc = cluster.incarnations[3]

    cluster.kill(3)
    epoch = cluster.wait_view([1, 2, 4], [1, 2, 4])
    assert epoch > first
    for i in (1, 2, 4):
        status = cluster.status(i)
        assert status["epoch"] == epoch
        assert_fenced_before_recovery(status, victim=3)
        ok = [r for r in fences(status) if r["node_id"] == 3 and r["ok"]]
        assert ok and ok[0]["incarnation"] == victim_inc and ok[0]["actor"] == 1
    actor = cluster.status(1)
    storage_fence = [r for r in actor["fence_history"] if r["method"] == "storage"]
    assert storage_fence[0]["detail"] == "confirmed by b1, b2"
    # Both block servers really banned exactly that incarnation, and a real NBD client
    # presenting it is refused.
    for s in servers:
        table = s.status()["fence_table"]
        assert f"{victim_inc:x}" in table["node3"]["banned"]
        assert not nbd_size(s, "node3", victim_inc)

    # The old incarnation is refused: the process is told so and exits 3.
    old = cluster.start(3, incarnation=victim_inc)
    assert old.wait(30) == 3
    assert "refused this incarnation" in cluster.log(3)
    assert [m["id"] for m in cluster.status(1)["members"]] == [1, 2, 4]

    # A restarted node (new incarnation) joins and is admitted at the block servers.
    cluster.start(3)
    cluster.wait_view([1, 2, 3, 4], [1, 2, 3, 4])
    new_inc = cluster.incarnations[3]
    assert new_inc != victim_inc
    for s in servers:
        assert nbd_size(s, "node1", cluster.incarnations[1]) == 16 << 20
        wait_for(
            lambda s=s: s.status()["fence_table"]["node3"]["admitted"] == f"{new_inc:x}",
            15,
            "ADMIT of the new incarnation",
        )
    for s in servers:
        assert nbd_size(s, "node3", new_inc) == 16 << 20
        assert not nbd_size(s, "node3", victim_inc)


@pytest.mark.timeout(90)
def test_failed_fences_are_retried_never_skipped(tmp_path, closing):
    agent, log, fail = write_agent(tmp_path, failures=3)
    cluster = Cluster(
        tmp_path,
        3,
        fence=[{"method": "agent", "command": str(agent), "options": {"plug": "slot-7"}}],
    )
    closing(cluster)
    cluster.start_all()
    cluster.wait_view([1, 2, 3], [1, 2, 3])
    cluster.kill(2)

    # While the agent keeps failing, recovery is blocked on the fence on both survivors.
    def blocked_with_failures():
        s = cluster.status(3)
        pending = [f for f in s["fences"] if not f["done"]]
        return (
            pending
            and s["recovery"]["stopped"]
            and "fencing of node 2" in s["recovery"]["waiting_for"]
            and len(agent_calls(log)) >= 2
        )

    wait_for(blocked_with_failures, 20, "recovery to wait on the failing fence")
    cluster.wait_view([1, 3], [1, 3], timeout=30)
    history = fences(cluster.status(1))
    results = [r["ok"] for r in history if r["node_id"] == 2]
    assert results == [False, False, False, True]
    assert "exited with status 1" in history[0]["detail"]
    assert "simulated power switch failure" in history[0]["detail"]
    for i in (1, 3):
        assert_fenced_before_recovery(cluster.status(i), victim=2)
    calls = agent_calls(log)
    assert len(calls) == 4
    assert calls[-1] == {"plug": "slot-7", "action": "off", "nodename": "node2"}


@pytest.mark.timeout(90)
def test_manual_fence_waits_for_fence_ack(tmp_path, closing):
    cluster = Cluster(tmp_path, 3, fence=[{"method": "manual"}])
    closing(cluster)
    cluster.start_all()
    cluster.wait_view([1, 2, 3], [1, 2, 3])
    cluster.kill(3)
    wait_for(
        lambda: "fencing of node 3" in cluster.status(2)["recovery"]["waiting_for"],
        20,
        "recovery to wait for the manual fence",
    )
    wait_for(lambda: "needs MANUAL fencing" in cluster.log(1), 10, "the manual-fence warning")

    admin = [sys.executable, "-m", "gfspy.admin.cli"]
    declined = subprocess.run(
        [*admin, "fence-ack", "3", "--socket", cluster.socket(2)],
        input="no\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert declined.returncode == 1 and "WILL be corrupted" in declined.stderr
    assert cluster.status(1)["recovery"]["stopped"]

    # Acknowledged on node 2; node 1 is the fence actor and learns it through gossip.
    acked = subprocess.run(
        [*admin, "fence-ack", "node3", "--yes", "--socket", cluster.socket(2)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert acked.returncode == 0, acked.stderr
    cluster.wait_view([1, 2], [1, 2])
    for i in (1, 2):
        status = cluster.status(i)
        assert_fenced_before_recovery(status, victim=3)
        manual = [r for r in status["fence_history"] if r["method"] == "manual" and r["ok"]]
        assert manual and manual[0]["node_id"] == 3

    shown = subprocess.run(
        [*admin, "status", "--socket", cluster.socket(1)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert shown.returncode == 0
    assert "manual   OK" in shown.stdout and "quorum: yes" in shown.stdout


@pytest.mark.timeout(60)
def test_broken_fence_path_is_reported_at_start(tmp_path, closing):
    missing = tmp_path / "fence_missing"
    cluster = Cluster(tmp_path, 2, fence=[{"method": "agent", "command": str(missing)}])
    closing(cluster)
    cluster.start_all()
    cluster.wait_view([1, 2], [1, 2])
    problems = wait_for(lambda: cluster.status(2)["fence_self_test"], 10, "the fence self-test")
    assert problems == [f"fence agent {missing} is not an executable file"]
    shown = subprocess.run(
        [sys.executable, "-m", "gfspy.admin.cli", "status", "--socket", cluster.socket(2)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert f"FENCE PATH BROKEN: fence agent {missing}" in shown.stdout


@pytest.mark.timeout(60)
def test_sigterm_leaves_cleanly_without_being_fenced(tmp_path, closing):
    agent, log, _ = write_agent(tmp_path)
    cluster = Cluster(tmp_path, 3, fence=[{"method": "agent", "command": str(agent)}])
    closing(cluster)
    cluster.start_all()
    cluster.wait_view([1, 2, 3], [1, 2, 3])
    cluster.kill(1, signal.SIGTERM)  # the coordinator and fence actor, even
    assert cluster.procs[1].returncode == 0, cluster.diagnose()
    assert "Traceback" not in cluster.log(1)
    epoch = cluster.wait_view([2, 3], [2, 3])
    for i in (2, 3):
        status = cluster.status(i)
        committed = [d for k, e, d in events(status, epoch) if k == "view_committed"]
        assert "removed [] left [1]" in committed[0]
        assert fences(status) == [] and not [f for f in status["fences"] if not f["done"]]
    assert agent_calls(log) == []
    cluster.start(1)  # and it may come back
    cluster.wait_view([1, 2, 3], [1, 2, 3])


def nbd_size(server: BlockServer, node: str, incarnation: int) -> int | None:
    """Export size as nbdinfo sees it when connecting as (node, incarnation); None if refused."""
    uri = f"nbd://{server.nbd}/lun%40{node}%3A{incarnation:x}"
    proc = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=30)
    return int(proc.stdout) if proc.returncode == 0 else None


@pytest.mark.timeout(90)
def test_two_nodes_with_block_server_as_witness(tmp_path, closing):
    server = BlockServer(tmp_path / "b1", name="b1")
    closing(server)
    cluster = Cluster(
        tmp_path, 2, fence=[{"method": "storage"}], storage=[server],
        quorum={"witness": True, "wait_for_all": True},
    )  # fmt: skip
    closing(cluster)
    cluster.start_all()
    cluster.wait_view([1, 2], [1, 2])
    quorum = cluster.status(1)["quorum"]
    assert (quorum["votes"], quorum["expected_votes"], quorum["witness_votes"]) == (3, 3, 1)

    # Alone, node 1 still has the witness's vote: 2 of 3. It fences node 2 and goes on.
    cluster.kill(2)
    cluster.wait_view([1], [1])
    status = cluster.status(1)
    assert [r["ok"] for r in fences(status)] == [True], cluster.diagnose()

    # Without the witness it is 1 of 3: no quorum, locking stops.
    server.close()
    wait_for(
        lambda: (s := cluster.status(1))["recovery"]["stopped"] and not s["quorum"]["quorate"],
        20, "loss of the witness vote to stop locking",
    )  # fmt: skip
    assert cluster.status(1)["quorum"]["witness_votes"] == 0

    # The witness comes back (same control address): quorum returns, and since the
    # membership did not change, a fresh view of the same members restarts locking.
    stopped_in = cluster.status(1)["epoch"]
    restarted = BlockServer(tmp_path / "b1", name="b1", control=server.control)
    closing(restarted)
    assert cluster.wait_view([1], [1]) > stopped_in


@pytest.mark.timeout(90)
def test_two_nodes_without_tie_breaker_never_fence(tmp_path, closing):
    agent, log, _ = write_agent(tmp_path)
    cluster = Cluster(tmp_path, 2, fence=[{"method": "agent", "command": str(agent)}])
    closing(cluster)
    cluster.start_all()
    cluster.wait_view([1, 2], [1, 2])
    cluster.kill(2)
    wait_for(lambda: not cluster.status(1)["quorum"]["quorate"], 20, "node 1 to lose quorum")
    status = cluster.status(1)
    assert status["recovery"]["stopped"] and status["epoch"] == cluster.status(1)["epoch"]
    assert [m["id"] for m in status["members"]] == [1, 2]  # no view without a majority
    assert agent_calls(log) == []  # and no fence from an inquorate node


@pytest.mark.timeout(90)
def test_two_node_mode_carries_on_alone(tmp_path, closing):
    agent, log, _ = write_agent(tmp_path)
    cluster = Cluster(
        tmp_path, 2, fence=[{"method": "agent", "command": str(agent)}],
        quorum={"two_node": True},
    )  # fmt: skip
    closing(cluster)
    cluster.start_all()
    cluster.wait_view([1, 2], [1, 2])
    cluster.kill(1)
    cluster.wait_view([2], [2])
    assert [c["nodename"] for c in agent_calls(log)] == ["node1"]


@pytest.mark.timeout(60)
def test_second_daemon_for_the_same_node_refuses_to_start(tmp_path, closing):
    cluster = Cluster(tmp_path, 2, fence=[{"method": "manual"}])
    closing(cluster)
    cluster.start_all()
    cluster.wait_view([1, 2], [1, 2])
    duplicate = subprocess.run(
        [sys.executable, "-m", "gfspy.cluster", "--config", str(cluster.config), "--node", "2",
         "--status-socket", str(tmp_path / "dup.sock"), "--state-dir", str(tmp_path / "dup")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert duplicate.returncode == 1
    errors = [ln for ln in duplicate.stderr.splitlines() if "gfspy-cluster:" in ln]
    assert len(errors) == 1 and "cannot start" in errors[0] and "in use" in errors[0]
    assert "Traceback" not in duplicate.stderr
    assert cluster.status(2)["state"] == "member"  # the real one is undisturbed


@pytest.mark.timeout(60)
def test_node_without_the_cluster_key_is_not_heard(tmp_path, closing):
    good, wrong = tmp_path / "cluster.key", tmp_path / "other.key"
    good.write_text(secrets.token_urlsafe(32))
    wrong.write_text(secrets.token_urlsafe(32))
    cluster = Cluster(tmp_path, 3, fence=[{"method": "manual"}], key_file=good)
    closing(cluster)
    cluster.start(1)
    cluster.start(2)
    # (Locking waits for node 3's startup fence, not needed here: the view is enough.)
    wait_for(lambda: [m["id"] for m in cluster.status(1)["members"]] == [1, 2], 20, "a view")
    # Node 3 has a different key: its datagrams (including any forged fence confirmation
    # or reject) are dropped, and it hears nobody either.
    impostor = tmp_path / "impostor.toml"
    impostor.write_text(cluster.config.read_text().replace(str(good), str(wrong)))
    cluster.start(3, config=impostor)
    wait_for(lambda: cluster.status(1)["heartbeat_rejected"] > 0, 20, "dropped datagrams")
    assert [m["id"] for m in cluster.status(1)["members"]] == [1, 2]
    s3 = wait_for(lambda: (s := cluster.status(3))["heartbeat_rejected"] and s, 20, "drops")
    assert s3["state"] == "joining" and s3["heard"] == []

    short = tmp_path / "short.key"
    short.write_text("tooshort")
    bad = tmp_path / "bad.toml"
    bad.write_text(cluster.config.read_text().replace(str(good), str(short)))
    proc = subprocess.run(
        [sys.executable, "-m", "gfspy.cluster", "--config", str(bad), "--node", "3",
         "--status-socket", str(tmp_path / "x.sock"), "--state-dir", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"gfspy-cluster: {short}: cluster key must be at least 16 bytes "
        "(e.g. head -c 32 /dev/urandom | base64 > FILE)"
    )
