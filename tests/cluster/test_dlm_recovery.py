"""The cluster daemon driving the real DLM: a dead node's locks go to others only after
its fence is confirmed, and the LVB it held under EX is marked invalid."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .harness import BlockServer, Cluster, agent_calls, events, fences, wait_for, write_agent


@pytest.fixture
def closing():
    started: list = []
    yield started.append
    for thing in reversed(started):
        thing.close()


def lock(cluster: Cluster, node: int, name: str, mode: str, wait: float = 10, **kw):
    answer = cluster.call(node, "lock", lockspace="fs1", name=name, mode=mode, wait=wait, **kw)
    assert answer["ok"], answer
    return answer


def lock_state(cluster: Cluster, node: int, lkid: int) -> dict:
    rows = cluster.call(node, "locks", lockspace="fs1")["locks"]
    return next(r for r in rows if r["lkid"] == lkid)


def seq_of(status: dict, kind: str, contains: str = "") -> int:
    return next(e["seq"] for e in status["events"] if e["kind"] == kind and contains in e["detail"])


@pytest.mark.timeout(120)
def test_dead_nodes_locks_granted_only_after_fence(tmp_path, closing):
    # The fence agent fails twice before it succeeds, which leaves a window in which the
    # dead node's lock must stay held although everyone knows the node is gone.
    agent, log, _ = write_agent(tmp_path, failures=2)
    cluster = Cluster(tmp_path, 4, fence=[{"method": "agent", "command": str(agent)}])
    closing(cluster)
    cluster.start_all()
    cluster.wait_view([1, 2, 3, 4], [1, 2, 3, 4])

    # Node 1 keeps an NL lock with a value block on inode-17 (as GFS2 keeps glocks cached,
    # which keeps the LVB alive); node 2 holds it EX with a value block; node 3 waits for
    # PR, node 4 for EX on another resource node 2 holds.
    keeper = lock(cluster, 1, "inode-17", "NL", valblk=True)
    assert keeper["mode"] == "NL"
    held = lock(cluster, 2, "inode-17", "EX", valblk=True)
    assert held["mode"] == "EX"
    lock(cluster, 2, "rgrp-3", "EX")
    waiter = lock(cluster, 3, "inode-17", "PR", wait=0.5, valblk=True)
    other = lock(cluster, 4, "rgrp-3", "EX", wait=0.5)
    assert waiter["mode"] == "IV" and other["mode"] == "IV"  # queued behind node 2

    cluster.kill(2)
    # While the fence keeps failing, the view has changed but the locks stay unavailable.
    wait_for(lambda: len(agent_calls(log)) >= 2, 20, "two failed fence attempts")
    s3 = cluster.status(3)
    assert s3["recovery"]["stopped"] and "fencing of node 2" in s3["recovery"]["waiting_for"]
    assert lock_state(cluster, 3, waiter["lkid"])["mode"] == "IV"
    assert lock_state(cluster, 4, other["lkid"])["mode"] == "IV"

    epoch = cluster.wait_view([1, 3, 4], [1, 3, 4], timeout=30)
    granted = wait_for(
        lambda: (r := lock_state(cluster, 3, waiter["lkid"]))["mode"] == "PR" and r,
        20,
        "node 3's PR after recovery",
    )
    # The LVB written under the dead node's EX cannot be trusted.
    assert granted["valnotvalid"]
    wait_for(lambda: lock_state(cluster, 4, other["lkid"])["mode"] == "EX", 20, "node 4's EX")

    for node, resource in ((3, "inode-17"), (4, "rgrp-3")):
        status = cluster.status(node)
        fenced = seq_of(status, "fence_confirmed", "node 2 ")
        started = seq_of(status, "ls_start")
        got = seq_of(status, "lock_granted", resource)
        assert fenced < got, events(status)
        assert started < got or got > fenced
        assert [
            e for e in status["events"] if e["kind"] == "lock_granted" and resource in e["detail"]
        ][0]["epoch"] == epoch
    attempts = [r["ok"] for r in fences(cluster.status(1))]
    assert attempts == [False, False, True]

    dump = cluster.call(3, "lockdump", lockspace="fs1")
    names = {r["name"]: r for r in dump["resources"]}
    if "inode-17" in names:  # mastered here: the dump shows it, with the invalid LVB
        assert names["inode-17"]["lvb_invalid"]
        assert any("PR" in lk and "node 3" in lk for lk in names["inode-17"]["granted"])


@pytest.mark.timeout(120)
def test_storage_fence_then_lock_handover(tmp_path, closing):
    server = BlockServer(tmp_path / "b1", name="b1")
    closing(server)
    cluster = Cluster(tmp_path, 3, fence=[{"method": "storage"}], storage=[server])
    closing(cluster)
    cluster.start_all()
    cluster.wait_view([1, 2, 3], [1, 2, 3])
    held = lock(cluster, 3, "journal-2", "EX")
    assert held["mode"] == "EX"
    waiter = lock(cluster, 1, "journal-2", "EX", wait=0.5)
    assert waiter["mode"] == "IV"
    victim_inc = cluster.incarnations[3]
    cluster.kill(3)
    cluster.wait_view([1, 2], [1, 2])
    wait_for(
        lambda: lock_state(cluster, 1, waiter["lkid"])["mode"] == "EX",
        20,
        "node 1's EX after node 3's fence",
    )
    status = cluster.status(1)
    assert seq_of(status, "fence_confirmed", "node 3 ") < seq_of(
        status, "lock_granted", "journal-2"
    )
    assert f"{victim_inc:x}" in server.status()["fence_table"]["node3"]["banned"]
    shown = subprocess.run(
        [sys.executable, "-m", "gfspy.admin.cli", "lockdump", "fs1", "--socket",
         cluster.socket(1)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "journal-2" in shown.stdout and "EX  master" in shown.stdout


@pytest.mark.timeout(120)
def test_fence_actor_dies_mid_fence_next_lowest_takes_over(tmp_path, closing):
    agent, log, _ = write_agent(tmp_path, failures=3)
    cluster = Cluster(tmp_path, 5, fence=[{"method": "agent", "command": str(agent)}])
    closing(cluster)
    cluster.start_all()
    cluster.wait_view([1, 2, 3, 4, 5], [1, 2, 3, 4, 5])
    # Node 1 masters "statfs" and holds it EX; node 4 keeps an NL copy of the value
    # block; node 5 waits for PW. Node 1's death takes the master *and* the EX holder.
    held = lock(cluster, 1, "statfs", "EX", valblk=True)
    assert held["mode"] == "EX"
    assert lock(cluster, 4, "statfs", "NL", valblk=True)["mode"] == "NL"
    waiter = lock(cluster, 5, "statfs", "PW", wait=0.5, valblk=True)
    assert waiter["mode"] == "IV"

    cluster.kill(2)
    # Node 1, the fence actor, is still failing to fence node 2 when it dies too.
    wait_for(lambda: len(agent_calls(log)) >= 1, 20, "a first (failed) fence of node 2")
    cluster.kill(1)
    epoch = cluster.wait_view([3, 4, 5], [3, 4, 5], timeout=40)

    status = cluster.status(3)
    done = {r["node_id"]: r for r in fences(status) if r["ok"]}
    assert set(done) == {1, 2} and {r["actor"] for r in done.values()} == {3}
    granted = wait_for(
        lambda: (r := lock_state(cluster, 5, waiter["lkid"]))["mode"] == "PW" and r,
        20,
        "node 5's PW after both fences",
    )
    assert granted["valnotvalid"]
    s5 = cluster.status(5)
    got = seq_of(s5, "lock_granted", "statfs")
    assert seq_of(s5, "fence_confirmed", "node 1 ") < got
    assert seq_of(s5, "fence_confirmed", "node 2 ") < got
    assert [e for e in s5["events"] if e["kind"] == "running"][-1]["epoch"] == epoch
