"""cluster.toml parsing (every mistake is one clear line) and quorum arithmetic."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gfspy.cluster.config import ConfigError, load_config, parse_config
from gfspy.cluster.quorum import QuorumCalculator, majority

EXAMPLE = Path(__file__).parents[2] / "gfspy" / "cluster" / "example-cluster.toml"


def nodes(n: int, fence: list | None = None) -> list[dict]:
    fence = fence or [{"method": "manual"}]
    return [
        {
            "id": i,
            "address": f"127.0.0.{i}:21064",
            "heartbeat": f"127.0.0.{i}:21065",
            "fence": fence,
        }
        for i in range(1, n + 1)
    ]


def config(n: int = 3, storage: int = 0, **quorum: object):
    data: dict = {"cluster": {"name": "c"}, "node": nodes(n), "quorum": quorum}
    data["storage"] = [
        {
            "name": f"s{i}",
            "nbd": f"nbd://127.0.0.9:{10809 + i}/lun",
            "control": f"127.0.0.9:{2000 + i}",
        }
        for i in range(storage)
    ]
    return parse_config(data)


@pytest.mark.timeout(10)
def test_example_config_parses():
    c = load_config(EXAMPLE)
    assert c.name == "alpha"
    assert [n.node_id for n in c.nodes] == [1, 2, 3]
    assert [f.method for f in c.node(1).fence] == ["storage", "agent"]
    agent = c.node(1).fence[1]
    assert dict(agent.options)["action"] == "off"
    assert c.node(2).fence[1].method == "manual"
    assert c.quorum.witness and c.quorum.wait_for_all
    assert c.storage[0].control == "10.0.0.10:10810"


BAD = [
    ('[cluster]\nname="c"\n', "missing 'node'"),
    ('[[node]]\nid=1\naddress="127.0.0.1"\nfence=[{method="manual"}]\n', "missing 'cluster'"),
    ('[cluster]\nname="c"\n[[node]]\nid=1\naddress="127.0.0.1"\n', "no fence method"),
    (
        '[cluster]\nname="c"\n[[node]]\nid=1\naddress="127.0.0.1"\nfence=[{method="stonith"}]\n',
        "unknown fence method",
    ),
    (
        '[cluster]\nname="c"\n[[node]]\nid=1\naddress="127.0.0.1"\nfence=[{method="agent"}]\n',
        "missing 'command'",
    ),
    (
        '[cluster]\nname="c"\n[[node]]\nid=1\naddress="127.0.0.1"\nfence=[{method="storage"}]\n',
        "needs at least one \\[\\[storage\\]\\]",
    ),
    (
        '[cluster]\nname="c"\n[[node]]\nid=1\naddress="127.0.0.1"\nvotez=1\nfence=[{method="manual"}]\n',
        "unknown key 'votez'",
    ),
    (
        '[cluster]\nname="c"\n[[node]]\nid=1\naddress="127.0.0.1"\nfence=[{method="manual"}]\n'
        '[[node]]\nid=1\naddress="127.0.0.2"\nfence=[{method="manual"}]\n',
        "duplicate id",
    ),
    (
        '[cluster]\nname="c"\n[[node]]\nid=1\naddress="127.0.0.1"\nfence=[{method="manual"}]\n'
        '[[node]]\nid=2\naddress="127.0.0.1"\nfence=[{method="manual"}]\n',
        "already used by node 1",
    ),
    (
        '[cluster]\nname="c"\n[[node]]\nid=1\naddress="host.example:1"\nfence=[{method="manual"}]\n',
        "must be an IP address",
    ),
    (
        '[cluster]\nname="c"\n[[node]]\nid="1"\naddress="127.0.0.1"\nfence=[{method="manual"}]\n',
        "'id' must be an integer",
    ),
    (
        '[cluster]\nname="c"\n[quorum]\ntwo_node=true\n[[node]]\nid=1\naddress="127.0.0.1"\n'
        'fence=[{method="manual"}]\n',
        "two_node needs exactly 2 nodes",
    ),
    (
        '[cluster]\nname="c"\n[timeouts]\nheartbeat_interval=2\nfailure_timeout=3\n[[node]]\nid=1\n'
        'address="127.0.0.1"\nfence=[{method="manual"}]\n',
        "at least twice",
    ),
    (
        '[cluster]\nname="c"\n[quorum]\nwait_for_all=1\n[[node]]\nid=1\naddress="127.0.0.1"\n'
        'fence=[{method="manual"}]\n',
        "must be true or false",
    ),
    (
        '[cluster]\nname="bad name"\n[[node]]\nid=1\naddress="127.0.0.1"\nfence=[{method="manual"}]\n',
        "letters, digits",
    ),
    ('[cluster\nname="c"\n', "not valid TOML"),
    (
        '[cluster]\nname="c"\nkey_file="rel.key"\n[[node]]\nid=1\naddress="127.0.0.1"\n'
        'fence=[{method="manual"}]\n',
        "key_file must be an absolute path",
    ),
]


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("text", "pattern"), BAD)
def test_bad_config_is_one_clear_line(tmp_path, text, pattern):
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path))


@pytest.mark.timeout(10)
def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.timeout(30)
def test_daemon_rejects_bad_config_without_traceback(tmp_path):
    path = tmp_path / "cluster.toml"
    path.write_text('[cluster]\nname="c"\n[[node]]\nid=1\naddress="127.0.0.1"\n')
    for argv, code in (
        (["--config", str(path), "--node", "1"], 2),
        (["--config", str(EXAMPLE), "--node", "7"], 2),
        (["--config", str(EXAMPLE), "--node", "1", "--incarnation", "zz"], 2),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "gfspy.cluster", *argv],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert proc.returncode == code, proc.stderr
        assert "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.timeout(10)
def test_majority_arithmetic():
    assert [majority(v) for v in (1, 2, 3, 4, 5, 6)] == [1, 2, 2, 3, 3, 4]
    q = QuorumCalculator(config(5))
    assert q.evaluate([1, 2, 3]).quorate
    assert not q.evaluate([4, 5]).quorate
    status = q.evaluate([1, 2])
    assert (status.votes, status.expected_votes, status.quorum) == (2, 5, 3)
    assert "2 of 5 votes, 3 needed" in status.reason
    # An even split of an even cluster: neither half may act.
    q4 = QuorumCalculator(config(4))
    assert not q4.evaluate([1, 2]).quorate and not q4.evaluate([3, 4]).quorate


@pytest.mark.timeout(10)
def test_expected_votes_override_and_raise():
    q = QuorumCalculator(config(3, expected_votes=5))
    assert not q.evaluate([1, 2]).quorate  # 2 of 5
    assert q.evaluate([1, 2, 3]).quorate  # 3 of 5


@pytest.mark.timeout(10)
def test_two_node_needs_wait_for_all_then_one_vote():
    q = QuorumCalculator(config(2, two_node=True))
    assert q.config.quorum.wait_for_all  # implied, as votequorum does
    status = q.evaluate([1])
    assert not status.quorate and "wait_for_all" in status.reason
    q.note_alive([1])
    assert not q.evaluate([1]).quorate
    q.note_alive([1, 2])
    assert q.evaluate([1]).quorate and q.evaluate([2]).quorate
    assert q.evaluate([1]).quorum == 1


@pytest.mark.timeout(10)
def test_block_servers_as_witness_votes():
    q = QuorumCalculator(config(2, storage=1, witness=True))
    assert q.expected_votes == 3
    assert q.evaluate([1], witnesses_reachable=1).quorate  # 1 node + the witness
    assert not q.evaluate([1], witnesses_reachable=0).quorate
    assert q.evaluate([1, 2], witnesses_reachable=0).quorate
    # A witness counts once however many times a node claims it.
    assert q.evaluate([1], witnesses_reachable=5).witness_votes == 1
    q3 = QuorumCalculator(config(3, storage=2, witness=True))
    assert q3.expected_votes == 5
    assert q3.evaluate([1], witnesses_reachable=2).quorate
    assert not q3.evaluate([1], witnesses_reachable=1).quorate


@pytest.mark.timeout(10)
def test_last_man_standing_lowers_expected_votes_after_window():
    q = QuorumCalculator(
        config(5, wait_for_all=True, last_man_standing=True, last_man_standing_window=10.0)
    )
    q.note_alive([1, 2, 3, 4, 5])
    q.observe_membership([1, 2, 3], 0, now=0.0)
    assert q.evaluate([1, 2, 3]).quorate and q.expected_votes == 5
    q.observe_membership([1, 2, 3], 0, now=5.0)
    assert q.expected_votes == 5  # not stable long enough
    q.observe_membership([1, 2, 3], 0, now=10.5)
    assert q.expected_votes == 3
    # Now two of the three suffice; a further loss inside the window does not lower more.
    assert q.evaluate([1, 2]).quorate
    q.observe_membership([1, 2], 0, now=11.0)
    q.observe_membership([1, 2], 0, now=22.0)
    assert q.expected_votes == 2  # never below two
    assert not q.evaluate([1]).quorate
    # Returning nodes raise it again.
    assert q.evaluate([1, 2, 3, 4]).quorate and q.expected_votes == 4


@pytest.mark.timeout(10)
def test_last_man_standing_requires_wait_for_all():
    with pytest.raises(ConfigError, match="needs wait_for_all"):
        config(3, last_man_standing=True)
