"""Run the mount in a detached child and let the parent exit only once it is ready.

mount(8) and scripts expect the helper to return when the filesystem can be used,
with a nonzero status and a message if it could not be mounted. So the parent
forks, the child detaches (new session, stdio on /dev/null) and reports one line
over a pipe: "ready" or "error <message>". If the child dies without a word, the
parent says so.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

log = logging.getLogger(__name__)

READY = b"ready"
ERROR = b"error "


class ReadyPipe:
    """The child's end of the pipe: report once, then close."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def _send(self, line: bytes) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, line + b"\n")
        except OSError as e:  # the parent died; nothing to report to
            log.debug("ready pipe: %s", e)
        finally:
            os.close(self._fd)
            self._fd = None

    def ready(self) -> None:
        self._send(READY)

    def error(self, message: str) -> None:
        self._send(ERROR + message.replace("\n", " ").encode("utf-8", "replace"))


def _detach_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    if devnull > 2:
        os.close(devnull)


def run_detached(serve: Callable[[ReadyPipe], int], prog: str) -> int:
    """Fork; the child runs serve() and exits with its code, the parent returns
    0 once the child reports ready, or prints the child's error and returns 32."""
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: become the daemon
        os.close(read_fd)
        os.setsid()
        os.chdir("/")  # never keep the caller's directory (or a mount) busy
        _detach_stdio()
        code = 2
        try:
            code = serve(ReadyPipe(write_fd))
        finally:
            os._exit(code)
    os.close(write_fd)
    chunks = []
    while True:
        chunk = os.read(read_fd, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_fd)
    line = b"".join(chunks).strip()
    if line == READY:
        return 0
    if line.startswith(ERROR):
        message = line[len(ERROR) :].decode("utf-8", "replace")
    else:
        # No report at all: the child died. Reap it to say how.
        _, status = os.waitpid(pid, 0)
        message = f"mount process exited unexpectedly (status {os.waitstatus_to_exitcode(status)})"
    print(f"{prog}: {message}", file=sys.stderr)
    return 32
