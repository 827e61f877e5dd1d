"""Crash consistency: the image is copied while the filesystem is still mounted, which
is exactly what the disk holds if the process is killed at that moment (every write
gfspy issued so far reached the file, nothing after it did). The copy must then
mount (replaying the journal), pass both checkers, and hold every fsync'd file.
"""

from __future__ import annotations

import os
import shutil

import pytest

from gfspy.fs.api import FsError

from .helpers import assert_clean, fsck_gfs2, list_dir, make_image, mounted, read_all, write_file


async def _churn(fs, parent: int, tag: bytes, count: int) -> None:
    """Metadata-heavy work: creates, renames, links, xattrs, deletes, a big file."""
    d = (await fs.mkdir(parent, tag, 0o755, 0, 0)).ino
    for i in range(count):
        ino = await write_file(fs, d, b"f%d" % i, os.urandom(i * 50))
        await fs.setxattr(ino, b"user.n", b"%d" % i, 0)
        if i % 4 == 0:
            await fs.rename(d, b"f%d" % i, parent, tag + b"-r%d" % i)
        if i % 5 == 0:
            await fs.link(ino, parent, tag + b"-l%d" % i)
        if i % 7 == 0 and i % 4:
            await fs.unlink(d, b"f%d" % i)
    big = await write_file(fs, d, b"big", os.urandom(700_000))
    await fs.write(big, 50 << 20, b"end")


@pytest.mark.timeout(150)
@pytest.mark.parametrize("commit_interval", [3600, 0.005], ids=["fsync-only", "log-wraps"])
async def test_crash_copies_replay_clean_and_keep_fsynced_data(tmp_path, commit_interval):
    img = make_image(tmp_path / "fs.img")
    synced: dict[bytes, bytes] = {}
    snapshots = []
    async with mounted(img, commit_interval=commit_interval) as fs:
        root = fs.root_ino
        for round_no in range(3):
            await _churn(fs, root, b"round%d" % round_no, 60 if commit_interval > 1 else 240)
            name = b"synced%d" % round_no
            data = os.urandom(10_000 + round_no * 300_000)
            ino = await write_file(fs, root, name, data)
            await fs.fsync(ino, False)
            synced[name] = data
            # Unsynced work after the fsync: the crash lands in the middle of it.
            await _churn(fs, root, b"after%d" % round_no, 25)
            copy = tmp_path / f"crash{round_no}.img"
            shutil.copyfile(img, copy)
            snapshots.append((copy, dict(synced)))
        if commit_interval < 1:  # the many small commits filled the log: it wrapped
            assert fs.journal.forced_checkpoints > 0

    for copy, expect in snapshots:
        _, lines = fsck_gfs2(copy, "-n")
        assert any("dirty" in line for line in lines), lines  # a real crash to recover
        fsck_copy = copy.with_suffix(".fsck.img")
        shutil.copyfile(copy, fsck_copy)
        # fsck.gfs2 -y replays the journal gfspy wrote, and then finds nothing wrong.
        rc, _ = fsck_gfs2(fsck_copy, "-y")
        assert rc in (0, 1), rc
        rc, complaints = fsck_gfs2(fsck_copy, "-n")
        assert rc == 0 and not complaints, "\n".join(complaints)
        fsck_copy.unlink()
        # gfspy's own mount replays it as well, and the fsync'd files are intact.
        async with mounted(copy) as fs:
            for name, data in expect.items():
                attr = await fs.lookup(fs.root_ino, name)
                assert await read_all(fs, attr.ino) == data
            await list_dir(fs, fs.root_ino)
        assert_clean(copy)
        copy.unlink()


@pytest.mark.timeout(60)
async def test_open_unlinked_file_lives_until_release_and_crash_frees_it(tmp_path):
    img = make_image(tmp_path / "fs.img")
    async with mounted(img) as fs:
        before = await fs.statfs()
        root = fs.root_ino
        ino = await write_file(fs, root, b"doomed", b"z" * 100_000)
        await fs.open(ino)
        await fs.unlink(root, b"doomed")
        assert await fs.read(ino, 0, 5) == b"zzzzz"  # still readable while open
        with pytest.raises(FsError):
            await fs.lookup(root, b"doomed")
        await fs.fsync(ino, False)
        crash = tmp_path / "crash.img"
        shutil.copyfile(img, crash)  # killed here: the inode is UNLINKED on disk
        await fs.release(ino)
        after = await fs.statfs()
        assert after.bfree == before.bfree
        # Unmounting with an unlinked file still open frees it too.
        ino = await write_file(fs, root, b"open-at-unmount", b"q" * 50_000)
        await fs.open(ino)
        await fs.unlink(root, b"open-at-unmount")
    assert_clean(img)

    async with mounted(crash) as fs:
        assert (await fs.statfs()).bfree == before.bfree  # the next mount freed it
    assert_clean(crash)


@pytest.mark.timeout(60)
async def test_second_journal_on_a_mkfs_gfs2_image(tmp_path):
    """Mounted with jid=1 on a two-journal mkfs.gfs2 image: journal1 takes the log,
    and after a crash the next jid=1 mount replays exactly that journal."""
    img = make_image(tmp_path / "fs.img", tool="mkfs.gfs2", extra=("-j", "2"))
    async with mounted(img, jid=1) as fs:
        ino = await write_file(fs, fs.root_ino, b"kept", b"journal one")
        await fs.fsync(ino, False)
        await _churn(fs, fs.root_ino, b"more", 20)
        crash = tmp_path / "crash.img"
        shutil.copyfile(img, crash)
    _, lines = fsck_gfs2(crash, "-n")
    assert any('"journal1") is dirty' in line for line in lines), lines
    async with mounted(crash, jid=1) as fs:
        attr = await fs.lookup(fs.root_ino, b"kept")
        assert await read_all(fs, attr.ino) == b"journal one"
    assert_clean(crash)
    assert_clean(img)
