"""Test harness: a gfspy-blockd subprocess on free ports, and a tiny raw NBD client.

The raw client is deliberately our own minimal code on top of gfspy.nbd.wire (not the
production client) so these tests exercise the server through bytes we control.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from gfspy.nbd import wire
from gfspy.nbd.wire import Cmd, Opt, Rep

REPO = Path(__file__).resolve().parents[2]


@dataclass
class BlockdProcess:
    """One gfspy-blockd bound to 127.0.0.1 port 0, found through --ready-file."""

    workdir: Path
    exports: dict[str, Path]
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    nbd_port: int = 0
    control: str = ""

    @property
    def log_path(self) -> Path:
        return self.workdir / "blockd.log"

    def start(self, listen: str = "127.0.0.1:0", control: str = "127.0.0.1:0") -> BlockdProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        ready = self.workdir / "ready.json"
        ready.unlink(missing_ok=True)
        cmd = [
            sys.executable, "-m", "gfspy.blockd",
            "--listen", listen, "--control", control,
            "--state", str(self.workdir / "state"),
            "--ready-file", str(ready),
            *self.extra_args,
            *(f"{name}={path}" for name, path in self.exports.items()),
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=log)
        deadline = time.monotonic() + 20
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"gfspy-blockd exited: {self.log_path.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError("gfspy-blockd did not become ready")
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        self.nbd_port = int(info["nbd"][0].rsplit(":", 1)[1])
        self.control = info["control"][0]
        return self

    def uri(self, export: str = "") -> str:
        return f"nbd://127.0.0.1:{self.nbd_port}/{export}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class RawNbd:
    """Handshake and pipelined simple-reply transmission over one trio stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.size = 0
        self.flags = 0
        self.description = ""

    @classmethod
    async def connect(cls, port: int) -> RawNbd:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def recv_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = await self.stream.receive_some(1 << 20)
            if not data:
                raise EOFError(f"server closed with {len(self.buf)} of {n} bytes")
            self.buf += data
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def at_eof(self) -> bool:
        """True when the server closed the connection (after any buffered bytes)."""
        try:
            while True:
                data = await self.stream.receive_some(65536)
                if not data:
                    return True
                self.buf += data
        except (trio.BrokenResourceError, ConnectionError):
            return True

    async def greet(self) -> None:
        wire.decode_greeting(await self.recv_exact(wire.GREETING_SIZE))
        await self.stream.send_all(wire.encode_client_flags())

    async def option(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option and collect replies up to the final ACK or error."""
        await self.stream.send_all(wire.encode_option(opt, data))
        replies = []
        while True:
            head = wire.decode_option_reply_header(
                await self.recv_exact(wire.OPTION_REPLY_HEADER_SIZE)
            )
            body = await self.recv_exact(head.length)
            replies.append((head.reply_type, body))
            if head.reply_type == Rep.ACK or wire.is_error_reply(head.reply_type):
                return replies

    async def go(self, name: str) -> tuple[int, bytes]:
        """GO; returns the final (reply type, data) and records the export details."""
        replies = await self.option(Opt.GO, wire.encode_info_request(name, [2, 3]))
        for kind, body in replies:
            if kind == Rep.INFO:
                item = wire.decode_info(body)
                if isinstance(item, wire.ExportInfo):
                    self.size, self.flags = item.size, item.flags
                elif isinstance(item, tuple) and item[0] == wire.InfoType.DESCRIPTION:
                    self.description = str(item[1])
        return replies[-1]

    async def open(self, name: str) -> None:
        await self.greet()
        kind, body = await self.go(name)
        if kind != Rep.ACK:
            raise PermissionError(f"GO refused: {Rep(kind).name}: {body.decode()}")

    async def send_request(
        self, cmd: int, cookie: int, offset: int, length: int, payload=b"", flags=0
    ):
        req = wire.Request(flags, cmd, cookie, offset, length)
        await self.stream.send_all(wire.encode_request(req) + payload)

    async def read_reply(self, read_lengths: dict[int, int]) -> tuple[int, int, bytes]:
        """(cookie, error, data); `read_lengths` maps READ cookies to their lengths."""
        reply = wire.decode_simple_reply(await self.recv_exact(wire.SIMPLE_REPLY_SIZE))
        data = b""
        if reply.error == 0 and reply.cookie in read_lengths:
            data = await self.recv_exact(read_lengths.pop(reply.cookie))
        return reply.cookie, reply.error, data

    async def call(self, cmd: int, offset: int = 0, length: int = 0, payload=b"", flags=0):
        """One request, one reply: (error, data)."""
        await self.send_request(cmd, 7, offset, length, payload, flags)
        lengths = {7: length} if cmd == Cmd.READ else {}
        _, error, data = await self.read_reply(lengths)
        return error, data

    async def aclose(self) -> None:
        await self.stream.aclose()
