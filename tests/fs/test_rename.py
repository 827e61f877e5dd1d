"""rename(2) semantics: replacing targets, directories across parents, the
NOREPLACE and EXCHANGE flags, and the cases POSIX forbids."""

from __future__ import annotations

import errno

import pytest

from gfspy.fs.api import RENAME_EXCHANGE, RENAME_NOREPLACE, FsError

from .helpers import assert_clean, list_dir, make_image, mounted, read_all, write_file


async def _errno_of(coro) -> int:
    with pytest.raises(FsError) as info:
        await coro
    return info.value.errno


@pytest.mark.timeout(60)
async def test_rename_rules(tmp_path):
    img = make_image(tmp_path / "fs.img", size_mib=64)
    async with mounted(img) as fs:
        root = fs.root_ino
        a = (await fs.mkdir(root, b"a", 0o755, 0, 0)).ino
        b = (await fs.mkdir(root, b"b", 0o755, 0, 0)).ino
        a_child = (await fs.mkdir(a, b"child", 0o755, 0, 0)).ino
        f1 = await write_file(fs, a, b"f1", b"one")
        f2 = await write_file(fs, b, b"f2", b"two")

        # Over an existing file: the target's inode goes away.
        await fs.rename(a, b"f1", b, b"f2")
        assert await read_all(fs, (await fs.lookup(b, b"f2")).ino) == b"one"
        await fs.forget(f2)
        assert await _errno_of(fs.getattr(f2)) == errno.ESTALE
        assert await _errno_of(fs.lookup(a, b"f1")) == errno.ENOENT

        # A directory moves to another parent: '..' and both link counts follow.
        await fs.rename(a, b"child", b, b"child")
        assert (await fs.getattr(a)).nlink == 2 and (await fs.getattr(b)).nlink == 3
        assert (await fs.lookup(a_child, b"..")).ino == b

        # Into its own subtree: refused.
        assert await _errno_of(fs.rename(root, b"b", a_child, b"loop")) == errno.EINVAL
        # Directory over a non-empty directory, file over directory and back.
        await fs.mkdir(a, b"full", 0o755, 0, 0)
        await fs.create((await fs.lookup(a, b"full")).ino, b"x", 0o100644, 0, 0)
        assert await _errno_of(fs.rename(b, b"child", a, b"full")) == errno.ENOTEMPTY
        assert await _errno_of(fs.rename(b, b"f2", a, b"full")) == errno.EISDIR
        assert await _errno_of(fs.rename(b, b"child", b, b"f2")) == errno.ENOTDIR
        # Directory over an empty directory.
        await fs.mkdir(a, b"empty", 0o755, 0, 0)
        await fs.rename(b, b"child", a, b"empty")
        assert (await fs.lookup(a, b"empty")).ino == a_child
        assert (await fs.getattr(b)).nlink == 2 and (await fs.getattr(a)).nlink == 4

        # NOREPLACE and EXCHANGE.
        await write_file(fs, root, b"x", b"X")
        await write_file(fs, root, b"y", b"Y")
        assert await _errno_of(fs.rename(root, b"x", root, b"y", RENAME_NOREPLACE)) == errno.EEXIST
        assert (
            await _errno_of(fs.rename(root, b"x", root, b"nope", RENAME_EXCHANGE)) == errno.ENOENT
        )
        await fs.rename(root, b"x", root, b"y", RENAME_EXCHANGE)
        assert await read_all(fs, (await fs.lookup(root, b"x")).ino) == b"Y"
        assert await read_all(fs, (await fs.lookup(root, b"y")).ino) == b"X"
        # Exchange a directory with a file across parents.
        await fs.rename(root, b"x", a, b"empty", RENAME_EXCHANGE)
        assert (await fs.lookup(root, b"x")).ino == a_child
        assert (await fs.lookup(a_child, b"..")).ino == root
        assert (await fs.getattr(a)).nlink == 3

        # Hard links to one inode: renaming one onto the other changes nothing.
        await fs.link(f1, root, b"f1-link")
        await fs.rename(b, b"f2", root, b"f1-link")
        assert sorted(await list_dir(fs, b)) == [b".", b"..", b"f2"]
        assert await _errno_of(fs.rename(root, b".", root, b"z")) == errno.EINVAL
    assert_clean(img)


@pytest.mark.timeout(30)
async def test_names_and_links(tmp_path):
    img = make_image(tmp_path / "fs.img", size_mib=64)
    async with mounted(img) as fs:
        root = fs.root_ino
        longest = b"n" * 255
        ino = await write_file(fs, root, longest, b"data")
        assert (await fs.lookup(root, longest)).ino == ino
        assert await _errno_of(fs.lookup(root, b"n" * 256)) == errno.ENAMETOOLONG
        assert await _errno_of(fs.mkdir(root, b"n" * 256, 0o755, 0, 0)) == errno.ENAMETOOLONG
        d = (await fs.mkdir(root, b"d", 0o755, 0, 0)).ino
        assert await _errno_of(fs.link(d, root, b"dirlink")) == errno.EPERM
        assert await _errno_of(fs.unlink(root, b"d")) == errno.EISDIR
        assert await _errno_of(fs.rmdir(root, longest)) == errno.ENOTDIR
        await fs.link(ino, d, b"second")
        await fs.unlink(root, longest)
        assert (await fs.lookup(d, b"second")).nlink == 1
        assert await read_all(fs, ino) == b"data"
    assert_clean(img)
