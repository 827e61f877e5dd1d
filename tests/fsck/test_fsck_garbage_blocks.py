"""Random bytes over one metadata block of each kind: gfspy-fsck must report the
block by number and exit 4, never crash, whatever the block held."""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import run_fsck_here
from .corrupt import Image, image_digest
from .populate import Populated


def _ea_blocks(im: Image, p: Populated) -> tuple[int, int]:
    ind = int.from_bytes(im.read(p.eafile)[168:176], "big")
    ea = int.from_bytes(im.read(ind)[24:32], "big")
    ed = int.from_bytes(im.read(ea)[48:56], "big")
    return ea, ed


#: Which block to destroy, by the kind of structure it holds.
TARGETS: dict[str, Callable[[Image, Populated], int]] = {
    "master_dinode": lambda im, p: im.sb.master_dir.addr,
    "rindex_dinode": lambda im, p: im.system("rindex"),
    "journal_dinode": lambda im, p: im.system("journal1"),
    "file_dinode": lambda im, p: p.files[b"file0123"],
    "exhash_leaf": lambda im, p: p.many_leaves[7],
    "hash_table_jd": lambda im, p: p.hashed_jd[1],
    "indirect_block": lambda im, p: p.big_in[0],
    "ea_block": lambda im, p: _ea_blocks(im, p)[0],
    "ed_block": lambda im, p: _ea_blocks(im, p)[1],
    "rgrp_bitmap_block": lambda im, p: im.rindex()[2].addr + 2,
    "quota_change_block": lambda im, p: im.data_blocks(im.system("quota_change0"))[0],
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", sorted(TARGETS))
def test_random_block_is_named(kind: str, populated_image: tuple[Path, Populated]) -> None:
    image, layout = populated_image
    im = Image(image)
    block = TARGETS[kind](im, layout)
    im.write(block, random.Random(kind).randbytes(im.bsize))
    before = image_digest(image)

    result = run_fsck_here("-n", image)

    assert result.returncode == 4, result.stdout + result.stderr
    assert result.stderr == ""
    assert re.search(rf"\b{block}\b", result.stdout), result.stdout
    *problems, summary = result.stdout.splitlines()
    assert problems
    assert all(": " in line or line.startswith("(further ") for line in problems)
    assert "problem(s) found, not corrected" in summary
    assert image_digest(image) == before
