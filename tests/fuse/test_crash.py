"""Crash consistency: SIGKILL the daemon in the middle of a metadata-heavy workload,
then check the image the way an administrator would, over many trials."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .helpers import Mount, assert_clean, fsck_gfs2, make_image

WORKLOAD = Path(__file__).with_name("crash_workload.py")
TRIALS = 20


def fsck_y_then_n(image: Path, scratch: Path) -> None:
    """fsck.gfs2 -y replays gfspy's journal on a copy; -n must then find nothing."""
    copy = scratch / "copy.img"
    subprocess.run(["cp", "--sparse=always", str(image), str(copy)], check=True, timeout=60)
    fixed = subprocess.run(
        ["fsck.gfs2", "-y", str(copy)], capture_output=True, text=True, timeout=120
    )
    assert fixed.returncode in (0, 1), (
        f"fsck.gfs2 -y exit {fixed.returncode}: {fixed.stdout[-3000:]}"
    )
    rc, complaints = fsck_gfs2(copy)
    assert rc == 0 and not complaints, f"after fsck.gfs2 -y: {complaints[:20]}"
    copy.unlink()


@pytest.mark.slow
@pytest.mark.timeout(280)
def test_sigkill_during_metadata_workload(tmp_path: Path, mounts: list[Mount]) -> None:
    rng = random.Random(20261125)
    image = make_image(tmp_path / "crash.img", size_mib=256)
    durable_log = tmp_path / "durable.log"
    durable_log.touch()
    for trial in range(TRIALS):
        m = Mount(image, tmp_path / "mnt", options="commit=1")
        mounts.append(m)
        m.start()
        # Everything logged as durable so far must be there, intact.
        expected = dict(line.split() for line in durable_log.read_text().splitlines())
        for name, digest in expected.items():
            data = (m.mountpoint / "keep" / name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == digest, f"trial {trial}: {name} differs"
        workload = subprocess.Popen(
            [sys.executable, str(WORKLOAD), str(m.mountpoint), str(durable_log), str(trial)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            time.sleep(rng.uniform(0.2, 1.5))
            assert workload.poll() is None, workload.stderr.read().decode()[-3000:]
            m.kill()
        finally:
            workload.kill()
            workload.wait(timeout=30)
            m.cleanup()
        if trial % 5 == 0:
            fsck_y_then_n(image, tmp_path)
    # The last crash too must be replayed by gfspy at mount, and leave a clean image.
    m = Mount(image, tmp_path / "mnt", options="commit=1")
    mounts.append(m)
    m.start()
    expected = dict(line.split() for line in durable_log.read_text().splitlines())
    assert len(expected) >= TRIALS  # the workload did get fsyncs in before the kills
    assert set(expected) <= {p.name for p in (m.mountpoint / "keep").iterdir()}
    assert m.unmount() == 0, m.log()
    assert_clean(image)
    # Every mount after a kill found its journal dirty and replayed it.
    replays = m.log_path.read_text(errors="replace").count("dirty, replaying")
    assert replays == TRIALS, f"{replays} replays after {TRIALS} crashes"
