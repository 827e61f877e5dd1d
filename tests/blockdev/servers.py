"""Real NBD servers for the client tests: nbdkit, qemu-nbd and gfspy-blockd subprocesses.

Every server binds a free port (never a fixed one) and is killed by the fixture that
started it, even when the test fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Wait until something accepts on host:port (or the process died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with {proc.returncode}: {proc.args}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_nbdkit(*plugin_args: str, host: str = "127.0.0.1") -> tuple[subprocess.Popen, int]:
    port = free_port(host)
    proc = subprocess.Popen(
        ["nbdkit", "--foreground", "--exit-with-parent", "-i", host, "-p", str(port), *plugin_args]
    )
    wait_port(host, port, proc)
    return proc, port


def start_qemu_nbd(image: Path, host: str = "127.0.0.1") -> tuple[subprocess.Popen, int]:
    port = free_port(host)
    proc = subprocess.Popen(
        [
            "qemu-nbd",
            "--persistent",
            "--shared=0",
            "-f",
            "raw",
            "-b",
            host,
            "-p",
            str(port),
            str(image),
        ]
    )
    wait_port(host, port, proc)
    return proc, port


@dataclass
class Blockd:
    """One gfspy-blockd process exporting `image` as `name`."""

    image: Path
    workdir: Path
    host: str = "127.0.0.1"
    control_host: str | None = None
    name: str = "lun0"
    wwid: str = "gfspy-test-wwid-0001"
    port: int = 0
    control_port: int = 0
    proc: subprocess.Popen | None = None
    extra_args: list[str] = field(default_factory=list)

    def start(self) -> Blockd:
        """Start (or restart on the same ports) and wait until it serves."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port(self.host)
        chost = self.control_host or self.host
        self.control_port = self.control_port or free_port(chost)
        ready = self.workdir / "ready.json"
        ready.unlink(missing_ok=True)
        cmd = [
            sys.executable, "-m", "gfspy.blockd",
            f"{self.name}={self.image}",
            "--wwid", f"{self.name}={self.wwid}",
            "--listen", f"{self.host}:{self.port}",
            "--control", f"{chost}:{self.control_port}",
            "--state", str(self.workdir / "state"),
            "--ready-file", str(ready),
            "--log-level", "INFO",
            *self.extra_args,
        ]  # fmt: skip
        logf = open(self.workdir / "blockd.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=logf, stderr=logf)
        logf.close()
        deadline = time.monotonic() + 20
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"gfspy-blockd exited: {(self.workdir / 'blockd.log').read_text()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError("gfspy-blockd did not become ready")
            time.sleep(0.05)
        json.loads(ready.read_text())
        return self

    @property
    def control(self) -> str:
        return f"{self.control_host or self.host}:{self.control_port}"

    def uri(self, node: str | None = "node1", *, scheme: str = "nbd", query: str = "") -> str:
        q = f"?control={self.control}"
        if node:
            q += f"&node={node}"
        return f"{scheme}://{self.host}:{self.port}/{self.name}{q}{query}"

    def log_text(self) -> str:
        return (self.workdir / "blockd.log").read_text(errors="replace")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)


def make_image(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def env_with_repo() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    return env
