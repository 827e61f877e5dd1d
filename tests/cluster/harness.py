"""Real multi-process clusters for tests: node daemons, gfspy-blockd servers, fence agents.

Every node gets its own 127.x.y.N address and free ports; every process started here is
killed by `close()` (the fixtures call it even when the test fails).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gfspy.cluster import admin_wire

REPO = Path(__file__).resolve().parents[2]

#: A fence agent following the fence-agents convention. It appends what it got on stdin
#: to LOG (one JSON object per call) and exits with the status in the file FAIL_FILE if
#: that holds a positive count (which it decrements), else 0.
AGENT_SCRIPT = """#!{python}
import json, os, sys
options = dict(line.rstrip("\\n").split("=", 1) for line in sys.stdin if "=" in line)
with open({log!r}, "a") as f:
    f.write(json.dumps(options) + "\\n")
fail_file = {fail!r}
if os.path.exists(fail_file):
    remaining = int(open(fail_file).read() or 0)
    if remaining > 0:
        open(fail_file, "w").write(str(remaining - 1))
        print("simulated power switch failure", file=sys.stderr)
        sys.exit(1)
print("Success: Powered OFF")
"""


def write_agent(directory: Path, failures: int = 0) -> tuple[Path, Path, Path]:
    """Create a test fence agent; returns (agent path, call log, failure-count file)."""
    agent, log, fail = directory / "fence_test", directory / "agent.log", directory / "agent.fail"
    agent.write_text(AGENT_SCRIPT.format(python=sys.executable, log=str(log), fail=str(fail)))
    agent.chmod(0o755)
    fail.write_text(str(failures))
    return agent, log, fail


def agent_calls(log: Path) -> list[dict[str, str]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def free_udp_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_tcp_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def loopback_prefix() -> str:
    """A 127.a.b prefix unlikely to be used by another test running at the same time."""
    return f"127.{20 + os.getpid() % 200}.{random.randrange(1, 255)}"


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (admin_wire.AdminWireError, KeyError) as exc:
            last_error = exc
        time.sleep(0.1)
    raise AssertionError(
        f"timed out waiting for {what}" + (f" ({last_error})" if last_error else "")
    )


class BlockServer:
    """A real gfspy-blockd with a control port, exporting a sparse image."""

    def __init__(
        self, directory: Path, host: str = "127.0.0.1", name: str = "b1", control: str = ""
    ) -> None:
        """Start a server; `control` reuses a control address (a restart), else port 0."""
        directory.mkdir(parents=True, exist_ok=True)
        image = directory / "lun.img"
        if not image.exists():
            image.write_bytes(b"")
            os.truncate(image, 16 << 20)
        ready = directory / "ready.json"
        ready.unlink(missing_ok=True)
        self.log = directory / "blockd.log"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gfspy.blockd",
                "--listen",
                f"{host}:0",
                "--control",
                control or f"{host}:0",
                "--state",
                str(directory / "state"),
                "--ready-file",
                str(ready),
                f"lun={image}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("w"),
        )
        info = wait_for(
            lambda: ready.exists() and ready.stat().st_size and json.loads(ready.read_text()),
            20,
            "gfspy-blockd to start",
        )
        self.control = info["control"][0]
        self.nbd = info["nbd"][0]
        self.name = name

    def status(self) -> dict[str, Any]:
        import trio

        from gfspy.blockd import control_client

        return trio.run(control_client.server_status, self.control)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Cluster:
    """N node daemons described by one cluster.toml under `directory`."""

    def __init__(
        self,
        directory: Path,
        n: int,
        fence: list[dict] | None = None,
        storage: list[BlockServer] = (),
        hosts: list[str] | None = None,
        quorum: dict | None = None,
        timeouts: dict | None = None,
        lockspaces: tuple[str, ...] = ("fs1",),
        key_file: Path | None = None,
    ) -> None:
        self.dir = directory
        prefix = loopback_prefix()
        self.hosts = hosts or [f"{prefix}.{i}" for i in range(1, n + 1)]
        self.procs: dict[int, subprocess.Popen] = {}
        self.incarnations: dict[int, int] = {}
        self.lockspaces = lockspaces
        self.netns: dict[int, str] = {}
        # Generous for a loaded 2-core machine running other suites at the same time: a
        # starved process must not look dead (the very problem the reference warns of).
        timeouts = {
            "heartbeat_interval": 0.25,
            "failure_timeout": 2.5,
            "fence_retry": 0.3,
            "fence_retry_max": 1.0,
            "fence_timeout": 10.0,
            **(timeouts or {}),
        }
        lines = ["[cluster]", 'name = "t"']
        if key_file:
            lines.append(f'key_file = "{key_file}"')
        lines.append("[timeouts]")
        lines += [f"{k} = {v}" for k, v in timeouts.items()]
        if quorum:
            lines.append("[quorum]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in quorum.items()]
        for s in storage:
            lines += [
                "[[storage]]",
                f'name = "{s.name}"',
                f'nbd = "nbd://{s.nbd}/lun"',
                f'control = "{s.control}"',
            ]
        fence = fence or [{"method": "manual"}]
        for i, host in enumerate(self.hosts, start=1):
            lines += [
                "[[node]]",
                f"id = {i}",
                f'name = "node{i}"',
                f'address = "{host}:{free_tcp_port(host) if host.startswith("127.") else 21064}"',
                f'heartbeat = "{host}:{free_udp_port(host) if host.startswith("127.") else 21065}"',
            ]
            for f in fence:
                lines.append("[[node.fence]]")
                for k, v in f.items():
                    if isinstance(v, dict):
                        inner = ", ".join(f"{a} = {json.dumps(b)}" for a, b in v.items())
                        lines.append(f"{k} = {{ {inner} }}")
                    else:
                        lines.append(f"{k} = {json.dumps(v)}")
        self.config = directory / "cluster.toml"
        self.config.write_text("\n".join(lines) + "\n")

    def socket(self, i: int) -> str:
        return str(self.dir / f"node{i}.sock")

    def start(
        self, i: int, incarnation: int | None = None, config: Path | None = None
    ) -> subprocess.Popen:
        argv = [
            sys.executable,
            "-m",
            "gfspy.cluster",
            "--config",
            str(config or self.config),
            "--node",
            str(i),
            "--status-socket",
            self.socket(i),
            "--state-dir",
            str(self.dir / "state"),
        ]
        for ls in self.lockspaces:
            argv += ["--lockspace", ls]
        if incarnation is not None:
            argv += ["--incarnation", f"{incarnation:x}"]
        if i in self.netns:
            argv = ["ip", "netns", "exec", self.netns[i], *argv]
        log = (self.dir / f"node{i}.log").open("a")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        self.procs[i] = proc
        return proc

    def start_all(self) -> None:
        for i in range(1, len(self.hosts) + 1):
            self.start(i)

    def status(self, i: int) -> dict[str, Any]:
        return admin_wire.call(self.socket(i), "status", timeout=5)

    def call(self, i: int, op: str, **kw: Any) -> dict[str, Any]:
        return admin_wire.call(self.socket(i), op, timeout=10, **kw)

    def log(self, i: int) -> str:
        return (self.dir / f"node{i}.log").read_text()

    def wait_view(self, nodes: list[int], members: list[int], timeout: float = 20) -> int:
        """Wait until every node in `nodes` runs an agreed view with exactly `members`."""

        def agreed() -> int | None:
            epochs = set()
            for i in nodes:
                s = self.status(i)
                if [m["id"] for m in s["members"]] != members or s["recovery"]["stopped"]:
                    return None
                epochs.add(s["epoch"])
            return epochs.pop() if len(epochs) == 1 else None

        try:
            epoch = wait_for(agreed, timeout, f"nodes {nodes} to agree on members {members}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.diagnose()}") from None
        for i in nodes:
            self.incarnations.update({m["id"]: m["incarnation"] for m in self.status(i)["members"]})
        return epoch

    def diagnose(self) -> str:
        """Exit codes and log tails of every node, for a failure message."""
        out = []
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGUSR1)  # stack dump into its log
        time.sleep(0.5)
        for i, proc in sorted(self.procs.items()):
            lines = [ln for ln in self.log(i).splitlines() if "late by" not in ln]
            out.append(f"--- node {i} (exit {proc.poll()}):\n" + "\n".join(lines[-40:]))
        return "\n".join(out)

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[i]
        if proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(10)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)


def events(status: dict[str, Any], epoch: int | None = None) -> list[tuple[str, int, str]]:
    return [
        (e["kind"], e["epoch"], e["detail"])
        for e in status["events"]
        if epoch is None or e["epoch"] == epoch
    ]


def kinds(status: dict[str, Any], epoch: int) -> list[str]:
    return [k for k, _, _ in events(status, epoch)]


def fences(status: dict[str, Any]) -> list[dict[str, Any]]:
    """Fence history without cancelled startup fences (nodes that merely booted late)."""
    return [r for r in status["fence_history"] if r["method"] != "startup"]
