"""A pulled cable: network namespaces joined by a veth pair, one side taken down.

Nodes 1 and 2 live in one namespace, node 3 in another. When the link goes down, node 3
is a minority: it loses quorum and stops granting locks; the majority agrees a view
without it, fences it and carries on. When the link comes back, node 3's incarnation has
been removed and fenced, so it is refused and exits; it can only return restarted.
"""

from __future__ import annotations

import os
import random
import subprocess

import pytest

from .harness import Cluster, agent_calls, wait_for, write_agent


def ip(*args: str, netns: str | None = None) -> None:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    subprocess.run(argv, check=True, capture_output=True, timeout=20)


class TwoSidedNetwork:
    """Two namespaces, a veth pair between them; addresses 10.a.b.1-2 | 10.a.b.3."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}{random.randrange(100, 999)}"
        self.left, self.right = f"gfc{tag}l", f"gfc{tag}r"
        self.veth_left, self.veth_right = f"gc{tag}l", f"gc{tag}r"
        subnet = f"10.{random.randrange(100, 250)}.{random.randrange(1, 250)}"
        self.hosts = [f"{subnet}.1", f"{subnet}.2", f"{subnet}.3"]
        self.created: list[str] = []
        try:
            for ns in (self.left, self.right):
                ip("netns", "add", ns)
                self.created.append(ns)
                ip("link", "set", "lo", "up", netns=ns)
            ip(
                "link",
                "add",
                self.veth_left,
                "netns",
                self.left,
                "type",
                "veth",
                "peer",
                "name",
                self.veth_right,
                "netns",
                self.right,
            )
            for host in self.hosts[:2]:
                ip("addr", "add", f"{host}/24", "dev", self.veth_left, netns=self.left)
            ip("addr", "add", f"{self.hosts[2]}/24", "dev", self.veth_right, netns=self.right)
            ip("link", "set", self.veth_left, "up", netns=self.left)
            ip("link", "set", self.veth_right, "up", netns=self.right)
        except BaseException:
            self.close()
            raise

    def cut(self) -> None:
        ip("link", "set", self.veth_right, "down", netns=self.right)

    def heal(self) -> None:
        ip("link", "set", self.veth_right, "up", netns=self.right)

    def close(self) -> None:
        for ns in self.created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        self.created.clear()


@pytest.fixture
def network():
    net = TwoSidedNetwork()
    yield net
    net.close()


@pytest.mark.timeout(120)
def test_minority_loses_quorum_majority_fences_it(tmp_path, network):
    agent, log, _ = write_agent(tmp_path)
    cluster = Cluster(
        tmp_path, 3, fence=[{"method": "agent", "command": str(agent)}], hosts=network.hosts
    )
    cluster.netns = {1: network.left, 2: network.left, 3: network.right}
    try:
        cluster.start_all()
        cluster.wait_view([1, 2, 3], [1, 2, 3])
        held = cluster.call(3, "lock", lockspace="fs1", name="dir-5", mode="EX", wait=10)
        assert held["mode"] == "EX"
        waiter = cluster.call(1, "lock", lockspace="fs1", name="dir-5", mode="PR", wait=0.5)
        assert waiter["mode"] == "IV"
        victim_inc = cluster.incarnations[3]

        network.cut()
        # The minority: no quorum, locking stopped, nothing granted.
        wait_for(
            lambda: (
                not cluster.status(3)["quorum"]["quorate"]
                and cluster.status(3)["recovery"]["stopped"]
            ),
            20,
            "node 3 to lose quorum",
        )
        late = cluster.call(3, "lock", lockspace="fs1", name="local-9", mode="EX", wait=2)
        assert late["mode"] == "IV", "an inquorate node granted a lock"
        s3 = cluster.status(3)
        assert [m["id"] for m in s3["members"]] == [1, 2, 3]  # it committed nothing new

        # The majority: new view, node 3 fenced, its lock handed over afterwards.
        epoch = cluster.wait_view([1, 2], [1, 2], timeout=30)
        assert epoch > s3["epoch"]
        calls = agent_calls(log)
        assert calls and calls[0]["nodename"] == "node3"
        wait_for(
            lambda: (
                next(
                    r
                    for r in cluster.call(1, "locks", lockspace="fs1")["locks"]
                    if r["lkid"] == waiter["lkid"]
                )["mode"]
                == "PR"
            ),
            20,
            "node 1's PR after node 3 was fenced",
        )
        s1 = cluster.status(1)
        fence_seq = next(
            e["seq"] for e in s1["events"]
            if e["kind"] == "fence_confirmed" and e["detail"].startswith("node 3 ")
        )  # fmt: skip
        grant_seq = next(
            e["seq"] for e in s1["events"] if e["kind"] == "lock_granted" and "dir-5" in e["detail"]
        )
        assert fence_seq < grant_seq
        still = cluster.call(3, "locks", lockspace="fs1")["locks"]
        assert next(r for r in still if r["lkid"] == late["lkid"])["mode"] == "IV"

        # Healing does not let the fenced incarnation back in: it is told and exits.
        network.heal()
        assert cluster.procs[3].wait(30) == 3
        assert "removed from the cluster" in cluster.log(3)
        assert [m["id"] for m in cluster.status(1)["members"]] == [1, 2]
        history = cluster.status(2)["fence_history"]
        assert any(
            r["node_id"] == 3 and r["incarnation"] == victim_inc and r["ok"] for r in history
        )
    finally:
        cluster.close()
