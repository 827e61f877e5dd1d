"""gfspy-fsck over NBD: nbdkit serves the image on a loopback TCP port and the check
reads it through gfspy's NBD client, finding the same things as on the local file."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import run_fsck
from .corrupt import Image, image_digest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def nbdkit_export(fresh_image: Path, tmp_path: Path) -> Iterator[tuple[str, Path, str]]:
    """nbdkit exporting the fresh image read-write (so only our client's read-only
    open protects it) on a free loopback port; stopped at teardown."""
    head_block, seq = Image(fresh_image).make_journal_dirty(0)
    port = _free_port()
    pidfile = tmp_path / "nbdkit.pid"
    proc = subprocess.Popen(
        ["nbdkit", "--foreground", "--exit-with-parent", "-i", "127.0.0.1", "-p", str(port),
         "-P", str(pidfile), "file", str(fresh_image)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not pidfile.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "nbdkit did not start"
            time.sleep(0.05)
        dirty = f"journal0: dirty (head at block {head_block}, seq {seq}); replay needed"
        yield f"nbd://127.0.0.1:{port}", fresh_image, dirty
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(60)
def test_check_over_nbd_finds_the_dirty_journal(nbdkit_export: tuple[str, Path, str]) -> None:
    uri, image, dirty_line = nbdkit_export
    before = image_digest(image)

    result = run_fsck("-n", uri)

    assert result.returncode == 4, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout
    assert lines[0] == dirty_line
    assert lines[1] == f"{uri}: 1 problem(s) found, not corrected (dirty journal 1)"
    assert image_digest(image) == before
