"""The oracle test: a heavy, realistic workload through the mount, then both checkers
on the unmounted image, then a second mount that must read everything back."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from .helpers import assert_clean, make_image

SOURCE_TREE = Path("/usr/lib/python3/dist-packages")


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> what it is and holds (file hash, link target, or 'dir')."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = "link:" + os.readlink(path)
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.mark.slow
@pytest.mark.timeout(280)
def test_heavy_workload_leaves_an_image_both_checkers_accept(tmp_path: Path, mount_image) -> None:
    image = make_image(tmp_path / "heavy.img", size_mib=1024)
    m = mount_image(image)
    root = m.mountpoint
    shutil.copytree(SOURCE_TREE, root / "tree", symlinks=True)
    expected = tree_digest(SOURCE_TREE)
    assert tree_digest(root / "tree") == expected

    # Renames: whole packages move, files are renamed over each other.
    packages = sorted(p for p in (root / "tree").iterdir() if p.is_dir())
    (root / "moved").mkdir()
    for pkg in packages[::3]:
        os.rename(pkg, root / "moved" / pkg.name)
        rel = pkg.name
        for key in [k for k in expected if k == rel or k.startswith(rel + "/")]:
            expected["../moved/" + key] = expected.pop(key)
    # Deletes: every fifth remaining package goes.
    for pkg in packages[1::5]:
        if (root / "tree" / pkg.name).exists():
            shutil.rmtree(root / "tree" / pkg.name)
            for key in [k for k in expected if k == pkg.name or k.startswith(pkg.name + "/")]:
                del expected[key]
    # Hard links to every .py file of one package; xattrs on many files.
    (root / "links").mkdir()
    for i, path in enumerate(sorted((root / "moved").rglob("*.py"))[:400]):
        os.link(path, root / "links" / f"{i}.py")
        os.setxattr(path, "user.origin", str(path.relative_to(root)).encode())
        if i % 10 == 0:
            os.setxattr(path, "user.bulk", os.urandom(6000))
    # Big sparse files: a hole then data at several heights.
    with open(root / "sparse", "wb") as f:
        for offset in (0, 5 << 20, 700 << 20, 3 << 30):
            f.seek(offset)
            f.write(os.urandom(1 << 20))
    with open(root / "dense", "wb") as f:
        for _ in range(64):
            f.write(os.urandom(1 << 20))
    dense_hash = hashlib.sha256((root / "dense").read_bytes()).hexdigest()
    # Files renamed over existing ones, and deleted while open.
    for i in range(200):
        (root / f"tmp{i}").write_bytes(os.urandom(i * 37))
        os.rename(root / f"tmp{i}", root / "links" / f"{i}.py")
    fd = os.open(root / "dense", os.O_RDONLY)
    os.unlink(root / "dense")
    assert hashlib.sha256(os.read(fd, 64 << 20)).hexdigest() == dense_hash
    os.close(fd)

    after = tree_digest(root / "tree")
    assert m.unmount() == 0, m.log()
    assert_clean(image)

    again = mount_image(image)
    assert tree_digest(again.mountpoint / "tree") == after
    moved = tree_digest(again.mountpoint / "moved")
    assert moved == {k[len("../moved/") :]: v for k, v in expected.items() if k.startswith("../")}
    with open(again.mountpoint / "sparse", "rb") as f:
        f.seek(3 << 30)
        assert len(f.read()) == 1 << 20
    assert not (again.mountpoint / "dense").exists()
    assert again.unmount() == 0
    assert_clean(image)
