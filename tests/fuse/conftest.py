"""Fixtures for the FUSE tests: every mount made here is unmounted in teardown."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .helpers import Mount, assert_clean, make_image


@pytest.fixture
def mounts() -> Iterator[list[Mount]]:
    """Mounts a test started; cleaned up (unmount, lazy unmount, kill) whatever happens."""
    started: list[Mount] = []
    yield started
    for m in started:
        m.cleanup()


@pytest.fixture
def mount_image(tmp_path: Path, mounts: list[Mount]) -> Callable[..., Mount]:
    """mount_image(image=None, options="", tool="gfspy") -> a ready Mount."""

    def _mount(image: Path | None = None, options: str = "", tool: str = "gfspy") -> Mount:
        if image is None:
            image = make_image(tmp_path / f"{tool}.img", tool=tool)
        m = Mount(image, tmp_path / f"mnt{len(mounts)}", options)
        mounts.append(m)
        return m.start()

    return _mount


@pytest.fixture(scope="module")
def shared_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    """One mount for a whole module of small POSIX checks (mounting costs a second)."""
    base = tmp_path_factory.mktemp("posix")
    m = Mount(make_image(base / "posix.img"), base / "mnt")
    try:
        m.start()
        yield m
        # Everything the module did must leave an image both checkers accept.
        assert m.unmount() == 0, m.log()
        assert_clean(m.image)
    finally:
        m.cleanup()
