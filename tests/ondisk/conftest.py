"""Fixtures that make real GFS2 images with Debian's mkfs.gfs2 (the format oracle).

Images are made once per test session and shared, because every test here only
reads them; tests that modify an image copy it into their own tmp_path first.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class ImageSpec:
    """One mkfs.gfs2 configuration."""

    bsize: int = 4096
    journals: int = 1
    lockproto: str = "lock_nolock"
    locktable: str = ""
    size_mib: int = 256
    rgsize_mib: int | None = None
    journal_mib: int | None = None
    extra: tuple[str, ...] = ()

    @property
    def ident(self) -> str:
        proto = "dlm" if self.lockproto == "lock_dlm" else "nolock"
        return f"b{self.bsize}-j{self.journals}-{proto}-{self.size_mib}M"

    def mkfs_args(self, path: Path) -> list[str]:
        args = ["mkfs.gfs2", "-O", "-b", str(self.bsize), "-j", str(self.journals)]
        args += ["-p", self.lockproto]
        if self.locktable:
            args += ["-t", self.locktable]
        if self.rgsize_mib:
            args += ["-r", str(self.rgsize_mib)]
        if self.journal_mib:
            args += ["-J", str(self.journal_mib)]
        return [*args, *self.extra, str(path)]


#: The configurations the whole-image walk runs over: every block size, 1-3
#: journals, both lock protocols, and sizes giving one to several rgrps with many
#: RB bitmap blocks (512-byte blocks: ~60 RB blocks in one rgrp).
IMAGE_SPECS = [
    ImageSpec(4096, 2, "lock_dlm", "c:fs", 256),
    ImageSpec(512, 1, "lock_nolock", "", 64),
    ImageSpec(1024, 3, "lock_dlm", "mycluster:gfs_1", 128),
    ImageSpec(2048, 1, "lock_nolock", "", 200, rgsize_mib=32),
    ImageSpec(4096, 1, "lock_dlm", "alpha:beta", 1024, rgsize_mib=64, journal_mib=16),
]

ImageFactory = Callable[[ImageSpec], Path]


def make_image(spec: ImageSpec, directory: Path) -> Path:
    """Run mkfs.gfs2 on a sparse file of the spec's size and return its path."""
    path = directory / f"{spec.ident}.img"
    with open(path, "wb") as image:
        image.truncate(spec.size_mib << 20)
    result = subprocess.run(spec.mkfs_args(path), capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"mkfs.gfs2 failed for {spec}: {result.stderr.strip()}")
    return path


@pytest.fixture(scope="session")
def gfs2_image_factory(tmp_path_factory: pytest.TempPathFactory) -> ImageFactory:
    """Returns make(spec) -> path of a pristine mkfs.gfs2 image, built once per spec.

    Callers must not modify the returned file; copy it (see `gfs2_image_copy`).
    """
    directory = tmp_path_factory.mktemp("gfs2-images")
    cache: dict[ImageSpec, Path] = {}

    def make(spec: ImageSpec) -> Path:
        if spec not in cache:
            cache[spec] = make_image(spec, directory)
        return cache[spec]

    return make


@pytest.fixture(params=IMAGE_SPECS, ids=lambda spec: spec.ident)
def gfs2_image(request: pytest.FixtureRequest, gfs2_image_factory: ImageFactory) -> Path:
    """A read-only mkfs.gfs2 image, once per configuration in IMAGE_SPECS."""
    return gfs2_image_factory(request.param)


@pytest.fixture
def gfs2_image_copy(gfs2_image_factory: ImageFactory, tmp_path: Path) -> Callable[..., Path]:
    """Returns copy(spec=ImageSpec()) -> a private, writable copy of an image."""

    def copy(spec: ImageSpec | None = None) -> Path:
        source = gfs2_image_factory(spec or ImageSpec())
        target = tmp_path / source.name
        subprocess.run(["cp", "--sparse=always", str(source), str(target)], check=True)
        return target

    return copy


def run_fsck(path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """fsck.gfs2 with `options` on an image (no pipe to stdin: never interactive)."""
    return subprocess.run(
        ["fsck.gfs2", *options, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
