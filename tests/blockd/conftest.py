"""Fixtures: gfspy-blockd processes that are always stopped, even when a test fails."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .harness import BlockdProcess

IMAGE_SIZE = 64 * 1024 * 1024


def make_image(path: Path, size: int = IMAGE_SIZE) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest.fixture
def start_blockd(tmp_path: Path) -> Iterator[Callable[..., BlockdProcess]]:
    """Factory: start_blockd({"name": path}, *extra_args) -> a running BlockdProcess."""
    started: list[BlockdProcess] = []

    def start(exports: dict[str, Path] | None = None, *extra: str, workdir: str = "blockd"):
        if exports is None:
            exports = {"disk": make_image(tmp_path / "disk.img")}
        server = BlockdProcess(tmp_path / workdir, exports, list(extra))
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
    for server in started:
        log = server.log_text()
        assert "Traceback" not in log and "internal error" not in log, log
