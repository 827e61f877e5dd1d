"""gfspy-blockd and the gfspy storage/fence/unfence commands as an operator uses them."""

from __future__ import annotations

import socket
import subprocess
import sys
from dataclasses import dataclass

import pytest

from gfspy.admin.cli import main as admin_main
from gfspy.blockd.cli import main as blockd_main

from .conftest import make_image
from .harness import REPO


def blockd_process(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gfspy.blockd", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str


def run_main(main, capsys, *args: str) -> Outcome:
    """Run a command's main() in-process (much faster than a fresh interpreter)."""
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse usage errors
        code = e.code
    out = capsys.readouterr()
    return Outcome(int(code or 0), out.out, out.err)


def one_line_error(result, code: int, text: str) -> None:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(60)
def test_blockd_help_and_usage_errors(tmp_path, capsys):
    helped = blockd_process("--help")
    assert helped.returncode == 0
    assert "exit status" in helped.stdout and "NAME@NODE:INCARNATIONHEX" in helped.stdout
    img = str(make_image(tmp_path / "d.img", 1 << 20))
    one_line_error(blockd_process("--drain-timeout", "0", f"a={img}"), 2, "must be positive")

    def blockd(*args: str) -> Outcome:
        return run_main(blockd_main, capsys, *args)

    assert blockd().returncode == 2
    one_line_error(blockd("noequals"), 2, "is not NAME=VALUE")
    one_line_error(blockd(f"a={img}", f"a={img}"), 2, "unique")
    one_line_error(blockd(f"a@b={img}"), 2, "'@'")
    one_line_error(blockd("--listen", "host:notaport", f"a={img}"), 2, "not a number")
    one_line_error(blockd("--tls-cert", img, f"a={img}"), 2, "go together")
    one_line_error(blockd("--wwid", "zz=1", f"a={img}"), 2, "unknown export")


@pytest.mark.timeout(60)
def test_blockd_start_failures_exit_1(tmp_path, capsys):
    img = str(make_image(tmp_path / "d.img", 1 << 20))
    one_line_error(blockd_process(f"a={tmp_path / 'missing.img'}"), 1, "No such file")

    def blockd(*args: str) -> Outcome:
        return run_main(blockd_main, capsys, *args)

    one_line_error(blockd(f"a={tmp_path}"), 1, "not a regular file or block device")
    state = tmp_path / "state"
    state.mkdir()
    (state / "fence-table.json").write_text("garbage")
    one_line_error(blockd("--state", str(state), f"a={img}"), 1, "cannot read fence table")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        one_line_error(blockd("--listen", f"127.0.0.1:{port}", f"a={img}"), 1, "cannot listen")
    # None of the failures created or changed anything.
    assert (state / "fence-table.json").read_text() == "garbage"


@pytest.mark.timeout(90)
def test_admin_fence_needs_every_server(start_blockd, tmp_path, capsys):
    def gfspy(*args: str) -> Outcome:
        return run_main(admin_main, capsys, *args)

    one = start_blockd({"disk": make_image(tmp_path / "a.img", 1 << 20)}, workdir="one")
    two = start_blockd({"disk": make_image(tmp_path / "b.img", 1 << 20)}, workdir="two")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens once closed

    both = gfspy("fence", "node7", "--server", one.control, "--server", two.control, "--epoch", "3")
    assert both.returncode == 0, both.stdout + both.stderr
    assert both.stdout.count("CONFIRMED") == 2

    partial = gfspy("fence", "node8", "--server", one.control, "--server", dead, "--timeout", "5")
    assert partial.returncode == 1
    assert f"{one.control}: CONFIRMED" in partial.stdout
    assert f"{dead}: UNREACHABLE" in partial.stdout
    assert "NOT fenced at every server" in partial.stderr

    status = gfspy("storage", "status", "--control", one.control)
    assert status.returncode == 0, status.stderr
    assert "node7: FENCED" in status.stdout and "node8: FENCED" in status.stdout
    assert "disk" in status.stdout

    stale = gfspy("unfence", "node7", "--server", one.control, "--epoch", "2")
    assert stale.returncode == 1 and "stale epoch" in stale.stdout
    lifted = gfspy("unfence", "node7", "--server", one.control, "--server", two.control)
    assert lifted.returncode == 0, lifted.stdout
    status = gfspy("storage", "status", "--control", two.control, "--json")
    assert '"fenced_all": false' in status.stdout

    one_line_error(gfspy("storage", "status", "--control", dead), 1, "failed")
    assert gfspy("fence", "node7").returncode == 2  # --server is required
    assert gfspy("fence", "n", "--server", one.control, "--incarnation", "xyz").returncode == 2
