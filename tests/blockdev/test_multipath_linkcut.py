"""Pull one path's cable mid-write: network namespaces + veth pairs.

The writer runs in its own network namespace and reaches server A over veth pair A and
server B over veth pair B. Both servers run in the root namespace on one image file.
Server A's control channel listens on B's link (a separate management path), so when
A's data link is cut the client can still SESSION_FENCE its old session before
reissuing the in-doubt writes on B.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from .netns_writer import BLOCK, pattern
from .servers import REPO, Blockd, env_with_repo, free_port, make_image


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


@pytest.fixture
def netns_links():
    """A namespace with two veth links to the root namespace; always torn down."""
    pid = os.getpid()
    ns = f"gfspy-bdev-{pid}"
    net = f"10.{200 + pid % 50}.{(pid // 50) % 250}"
    links = {
        "a": (f"gba{pid}"[:15], f"gna{pid}"[:15], f"{net}.1", f"{net}.2"),
        "b": (f"gbb{pid}"[:15], f"gnb{pid}"[:15], f"{net}.5", f"{net}.6"),
    }
    try:
        ip("netns", "add", ns)
        ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        for host_if, ns_if, host_ip, ns_ip in links.values():
            ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
            ip("link", "set", ns_if, "netns", ns)
            ip("addr", "add", f"{host_ip}/30", "dev", host_if)
            ip("link", "set", host_if, "up")
            ip("netns", "exec", ns, "ip", "addr", "add", f"{ns_ip}/30", "dev", ns_if)
            ip("netns", "exec", ns, "ip", "link", "set", ns_if, "up")
        yield ns, links
    finally:
        for host_if, *_ in links.values():
            ip("link", "del", host_if, check=False)
        ip("netns", "del", ns, check=False)


@pytest.mark.timeout(120)
def test_link_cut_mid_write_fails_over_after_session_fence(tmp_path, netns_links):
    ns, links = netns_links
    host_a, host_b = links["a"][2], links["b"][2]
    image = make_image(tmp_path / "lun.img", 64 * 1024 * 1024)
    a = Blockd(image, tmp_path / "a", host=host_a, control_host=host_b)
    b = Blockd(image, tmp_path / "b", host=host_b)
    a.port, a.control_port = free_port(host_a), free_port(host_b)
    writer = None
    try:
        a.start()
        b.start()
        polling = 2.0
        count = 400
        writer = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.blockdev.netns_writer",
             f"{a.uri()},{b.uri()}", "--count", str(count), "--polling-interval", str(polling)],
            cwd=REPO, env=env_with_repo(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert writer.stdout is not None
        line = writer.stdout.readline()
        assert line.strip() == "READY", writer.stderr.read() if writer.stderr else line
        ip("link", "set", links["a"][0], "down")  # pull A's cable mid-write
        cut_at = time.monotonic()
        out, err = writer.communicate(timeout=90)
        assert writer.returncode == 0, err
        result = json.loads(out.strip().splitlines()[-1])
        print(f"stall after link cut: {result['max_gap']:.3f} s (polling_interval {polling} s)")
        print(f"writer finished {time.monotonic() - cut_at:.1f} s after the cut")
        assert result["errors"] == []
        assert result["done"] == count
        assert result["max_gap"] < polling + 2.0
        groups = result["status"]["groups"]
        assert groups[0]["paths"][0]["state"] == "failed"
        assert groups[1]["status"] == "active"
        # The in-doubt writes were reissued only after A confirmed the old session drained.
        assert "confirmed); reissuing" in err, err
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
            writer.wait()
        a.stop()
        b.stop()
    content = image.read_bytes()
    for i in range(count):
        assert content[i * BLOCK : (i + 1) * BLOCK] == pattern(i), f"block {i} differs"
