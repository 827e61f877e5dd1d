"""The journal over the real network path: our NBD client talking to a real nbdkit
serving the image on loopback. A node commits and dies; a survivor recovers its journal
over NBD; the image on the server passes fsck.gfs2."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gfspy.blockdev.device import open_device
from gfspy.journal.log import open_journal
from gfspy.journal.replay import recover_journal
from gfspy.journal.transaction import Transaction

from .helpers import (
    BSIZE,
    assert_fsck_silent,
    data_block,
    free_blocks,
    fsck,
    make_image,
    metadata_block,
    read_block,
    root_dinode,
    touched_root,
)


@pytest.fixture
def nbdkit_export(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A fresh image served by nbdkit's file plugin on a free loopback port."""
    image = make_image(tmp_path / "fs.img")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        ["nbdkit", "--foreground", "--exit-with-parent", "-i", "127.0.0.1", "-p", str(port)]
        + ["file", str(image)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else "nbdkit died"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                assert time.monotonic() < deadline, "nbdkit did not start listening"
                time.sleep(0.05)
        yield image, f"nbd://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(90)
async def test_commit_crash_and_recovery_over_nbd(
    nbdkit_export: tuple[Path, str], tmp_path: Path
) -> None:
    image, uri = nbdkit_export
    dev = await open_device(uri)
    try:
        root, root_img = await root_dinode(dev)
        a, b = await free_blocks(dev, 2)
        journal = await open_journal(dev, 0)
        t = Transaction(BSIZE)
        t.add_metadata(root, touched_root(root_img, 0o701, 9))
        t.add_metadata(a, metadata_block(a, 9))
        t.add_jdata(b, data_block(9, starts_with_magic=True))
        await journal.commit(t)
    finally:
        await dev.aclose()  # the node dies with its change only in the log
    assert fsck(image, "-n").dirty

    dev = await open_device(uri)
    try:  # a survivor, also over NBD
        result = await recover_journal(dev, 0, recovery=True)
        assert (result.metadata_replayed, result.jdata_replayed) == (2, 1)
        journal = await open_journal(dev, 0)
        t = Transaction(BSIZE)
        t.add_metadata(a, metadata_block(a, 10))
        await journal.commit(t)
        await journal.clean_unmount()
    finally:
        await dev.aclose()
    assert read_block(image, root) == touched_root(root_img, 0o701, 9)
    assert read_block(image, a) == metadata_block(a, 10)
    assert read_block(image, b) == data_block(9, starts_with_magic=True)
    assert_fsck_silent(image, tmp_path)
