"""A real kill -9: a process churning through FileSystem is killed at a random
moment (possibly inside a device or log write). The next mount replays its journal,
both checkers are silent, and every file it reported as fsync'd reads back intact.
fsck.gfs2 -y replaying the same journal is checked on a copy."""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys

import pytest
import trio

from .crash_worker import payload
from .helpers import REPO, assert_clean, fsck_gfs2, make_image, mounted, read_all


async def _run_and_kill(img, rng: random.Random) -> list[tuple[bytes, int, int]]:
    """Start the worker, let it report a few fsyncs, then SIGKILL it mid-stride."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tests.fs.crash_worker", str(img)],
        cwd=REPO,
        stdout=subprocess.PIPE,
    )
    synced: list[tuple[bytes, int, int]] = []
    buffer = b""
    want = rng.randrange(1, 4)
    try:
        with trio.fail_after(60):
            while len(synced) < want:
                chunk = await proc.stdout.receive_some()
                assert chunk, "worker exited early"
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    _, name, size, seed = line.split()
                    synced.append((name, int(size), int(seed)))
        await trio.sleep(rng.uniform(0, 0.4))  # land somewhere inside the next round
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    return synced


@pytest.mark.timeout(150)
async def test_sigkill_trials(tmp_path):
    rng = random.Random(1900)
    for trial in range(3):
        img = make_image(tmp_path / f"t{trial}.img", size_mib=96)
        synced = await _run_and_kill(img, rng)
        copy = tmp_path / f"t{trial}-fsck.img"
        shutil.copyfile(img, copy)
        rc, _ = fsck_gfs2(copy, "-y")
        assert rc in (0, 1), rc
        rc, complaints = fsck_gfs2(copy, "-n")
        assert rc == 0 and not complaints, "\n".join(complaints)
        copy.unlink()
        async with mounted(img) as fs:
            for name, size, seed in synced:
                attr = await fs.lookup(fs.root_ino, name)
                assert await read_all(fs, attr.ino) == payload(seed, size), name
        assert_clean(img)
        img.unlink()
