"""Cluster start: startup fencing of absent nodes, clean joins, epochs across restarts."""

from __future__ import annotations

import signal

import pytest

from .harness import Cluster, agent_calls, wait_for, write_agent


@pytest.fixture
def closing():
    started: list = []
    yield started.append
    for thing in reversed(started):
        thing.close()


@pytest.mark.timeout(90)
def test_absent_node_is_startup_fenced_and_late_joiner_is_not(tmp_path, closing):
    agent, log, _ = write_agent(tmp_path)
    cluster = Cluster(
        tmp_path, 4, fence=[{"method": "agent", "command": str(agent)}],
        timeouts={"startup_fence_delay": 2.0},
    )  # fmt: skip
    closing(cluster)
    for i in (1, 2, 3):
        cluster.start(i)
    first = cluster.wait_view([1, 2, 3], [1, 2, 3], timeout=30)
    # Node 4 never came: it may be running with state from an earlier life, so it was
    # fenced (whatever incarnation) before any lockspace started.
    calls = agent_calls(log)
    assert [c["nodename"] for c in calls] == ["node4"]
    status = cluster.status(1)
    startup = [r for r in status["fence_history"] if r["node_id"] == 4]
    assert startup and startup[0]["ok"] and startup[0]["incarnation"] == 0
    kinds = [e["kind"] for e in status["events"]]
    assert kinds.index("fence_confirmed") < kinds.index("ls_start")

    # Node 4 now starts fresh and joins; nobody is fenced again.
    cluster.start(4)
    second = cluster.wait_view([1, 2, 3, 4], [1, 2, 3, 4])
    assert second > first
    assert len(agent_calls(log)) == 1

    # A full restart keeps numbering views upwards (the epoch is kept on disk).
    for i in (1, 2, 3, 4):
        cluster.kill(i, signal.SIGTERM)
    for i in (1, 2, 3, 4):
        cluster.start(i)
    third = cluster.wait_view([1, 2, 3, 4], [1, 2, 3, 4], timeout=30)
    assert third > second


@pytest.mark.timeout(60)
def test_slow_starter_joins_cleanly_without_being_fenced(tmp_path, closing):
    agent, log, _ = write_agent(tmp_path)
    cluster = Cluster(
        tmp_path, 3, fence=[{"method": "agent", "command": str(agent)}],
        timeouts={"startup_fence_delay": 30.0},
    )  # fmt: skip
    closing(cluster)
    cluster.start(1)
    cluster.start(2)
    wait_for(lambda: cluster.status(1)["epoch"] > 0, 20, "a first view of nodes 1 and 2")
    wait_for(lambda: "node 3 is absent" in cluster.log(1), 10, "the startup-fence warning")
    cluster.start(3)
    cluster.wait_view([1, 2, 3], [1, 2, 3])
    assert agent_calls(log) == []
    history = cluster.status(2)["fence_history"]
    assert [r["method"] for r in history] == ["startup"]
    assert "joined cleanly" in history[0]["detail"]
