"""`gfspy paths`: multipath -ll style status, with documented exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .servers import REPO, Blockd, free_port, make_image


def gfspy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gfspy.admin.cli", *args],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.timeout(90)
def test_paths_shows_groups_and_states(tmp_path):
    image = make_image(tmp_path / "lun.img", 8 << 20)
    a = Blockd(image, tmp_path / "a").start()
    b = Blockd(image, tmp_path / "b").start()
    try:
        spec = f"{a.uri(None)},{b.uri(None)}"
        ok = gfspy("paths", spec)
        assert ok.returncode == 0, ok.stderr
        assert "wwid=gfspy-test-wwid-0001" in ok.stdout
        assert "group 0 status=active" in ok.stdout and "group 1 status=enabled" in ok.stdout
        assert ok.stdout.count("active ready") == 2

        multibus = gfspy("paths", "--policy", "multibus", "--json", spec)
        status = json.loads(multibus.stdout)
        assert len(status["groups"]) == 1 and len(status["groups"][0]["paths"]) == 2

        b.kill()
        degraded = gfspy("paths", "--timeout", "2", spec)
        assert degraded.returncode == 1
        assert "failed faulty" in degraded.stdout and "group 1 status=failed" in degraded.stdout
    finally:
        a.stop()
        b.stop()


@pytest.mark.timeout(60)
def test_paths_bad_input_is_one_line_and_an_exit_code(tmp_path):
    usage = gfspy("paths", "nbd://127.0.0.1:1/x,,nbd://127.0.0.1:2/y")
    assert usage.returncode == 2 and len(usage.stderr.strip().splitlines()) == 1
    bad_uri = gfspy("paths", "http://example/x")
    assert bad_uri.returncode == 1 and "Traceback" not in bad_uri.stderr
    assert len(bad_uri.stderr.strip().splitlines()) == 1
    port = free_port()
    nothing = gfspy("paths", "--timeout", "2", f"nbd://127.0.0.1:{port}/x")
    assert nothing.returncode == 1
    assert "refused" in nothing.stderr and "Traceback" not in nothing.stderr
    assert len(nothing.stderr.strip().splitlines()) == 1
