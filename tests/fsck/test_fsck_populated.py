"""A populated image (exhash directories, leaves, hard links, deep files, xattrs) is
clean for both fsck.gfs2 and gfspy-fsck; single faults in those structures are named
by gfspy-fsck and noticed by fsck.gfs2."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import run_fsck_gfs2, run_fsck_here
from .corrupt import Image, image_digest
from .populate import Populated

LEAF_DEPTH, LEAF_ENTRIES = 24, 26
DI_NLINK, DI_ENTRIES = 52, 148
DE_FORMAL, DE_ADDR, DE_TYPE = 0, 8, 24
METATYPE_LF, METATYPE_ED = 6, 11


@pytest.mark.timeout(60)
def test_populated_image_is_clean(populated_image: tuple[Path, Populated]) -> None:
    image, _ = populated_image
    assert run_fsck_gfs2(image).returncode == 0
    before = image_digest(image)
    result = run_fsck_here("-n", "-v", image)
    assert result.returncode == 0, result.stdout
    assert "pass1: 325 dinodes to check" in result.stdout
    assert result.stdout.splitlines()[-1] == f"{image}: clean, no problems found"
    assert image_digest(image) == before


@dataclass(frozen=True)
class Fault:
    name: str
    #: Corrupts the image; returns the values substituted into `expect`.
    inject: Callable[[Image, Populated], dict[str, int]]
    expect: str
    oracle: str | None = None


def _lf_entries(im: Image, p: Populated) -> dict[str, int]:
    leaf = p.many_leaves[3]
    im.add_u16(leaf, LEAF_ENTRIES, 1)
    return {"dir": p.many, "leaf": leaf}


def _lf_depth(im: Image, p: Populated) -> dict[str, int]:
    leaf = p.many_leaves[5]
    im.set_u16(leaf, LEAF_DEPTH, 5)
    return {"dir": p.many, "leaf": leaf}


def _di_entries(im: Image, p: Populated) -> dict[str, int]:
    block = im.read(p.many)
    block[DI_ENTRIES + 3] += 1
    im.write(p.many, block)
    return {"dir": p.many}


def _formal(im: Image, p: Populated) -> dict[str, int]:
    """Root's entry for the subdirectory: fsck.gfs2 3.5.0 checks formal numbers of
    directory entries that name directories only."""
    root = im.sb.root_dir.addr
    off = im.dirent_offset(root, b"sub")
    block = im.read(root)
    block[off + DE_FORMAL + 2] ^= 0x40
    im.write(root, block)
    return {"dir": root, "off": off}


def _de_type(im: Image, p: Populated) -> dict[str, int]:
    off = im.dirent_offset(p.sub, b"inner")
    im.set_u16(p.sub, off + DE_TYPE, 4)
    return {"dir": p.sub, "off": off}


def _duplicate(im: Image, p: Populated) -> dict[str, int]:
    """small's first data pointer now names big's first data block."""
    big_data = im.data_blocks(p.big)[0]
    im.set_u64(p.small, 232, big_data)
    return {"block": big_data, "a": min(p.small, p.big), "b": max(p.small, p.big)}


def _in_type(im: Image, p: Populated) -> dict[str, int]:
    im.set_type(p.big_in[1], METATYPE_LF)
    return {"ino": p.big, "block": p.big_in[1]}


def _jd_type(im: Image, p: Populated) -> dict[str, int]:
    im.set_type(p.hashed_jd[0], METATYPE_LF)
    return {"ino": p.hashed, "block": p.hashed_jd[0]}


def _orphan(im: Image, p: Populated) -> dict[str, int]:
    """sub's entry 'inner' now names file0000 (formal kept right): inner is orphaned."""
    off = im.dirent_offset(p.sub, b"inner")
    target = p.files[b"file0000"]
    formal = int.from_bytes(im.read(target)[24:32], "big")
    inner = int.from_bytes(im.read(p.sub)[off + DE_ADDR : off + DE_ADDR + 8], "big")
    im.set_u64(p.sub, off + DE_FORMAL, formal)
    im.set_u64(p.sub, off + DE_ADDR, target)
    return {"inner": inner, "target": target}


def _chained_lf_entries(im: Image, p: Populated) -> dict[str, int]:
    im.add_u16(p.hashed_chain, LEAF_ENTRIES, -1)
    return {"dir": p.hashed, "leaf": p.hashed_chain}


def _unreachable_dir(im: Image, p: Populated) -> dict[str, int]:
    """Root's entry 'sub' now names the directory 'many': sub is cut off from the
    tree and many has two parents."""
    root = im.sb.root_dir.addr
    off = im.dirent_offset(root, b"sub")
    formal = int.from_bytes(im.read(p.many)[24:32], "big")
    im.set_u64(root, off + DE_FORMAL, formal)
    im.set_u64(root, off + DE_ADDR, p.many)
    return {"sub": p.sub, "many": p.many, "root": root}


def _ed_type(im: Image, p: Populated) -> dict[str, int]:
    ind = int.from_bytes(im.read(p.eafile)[168:176], "big")
    ea = int.from_bytes(im.read(ind)[24:32], "big")
    ed = int.from_bytes(im.read(ea)[24 + 16 + 8 : 24 + 16 + 16], "big")
    im.set_type(ed, METATYPE_LF)
    return {"ino": p.eafile, "block": ed}


def _unlinked(im: Image, p: Populated) -> dict[str, int]:
    block = im.set_block_state(p.files[b"file0200"], 2)
    rgrp = next(e.addr for e in im.rindex() if e.contains(block))
    return {"block": block, "rgrp": rgrp}


FAULTS = [
    Fault(
        "unreachable_directory",
        _unreachable_dir,
        r"^inode {sub}: directory is not reachable from root or master$",
        r"[Uu]nlinked|lost\+found|Found a hard link|hard link",
    ),
    Fault(
        "directory_linked_twice",
        _unreachable_dir,
        r"^inode {many}: directory is linked from both inode {root} and inode {root}$",
    ),
    Fault(
        "unlinked_state",
        _unlinked,
        r"^rgrp {rgrp}: 1 block\(s\) are marked UNLINKED \(inodes awaiting deallocation\)$",
        r"bitmap says 2 \(other\)",
    ),
    Fault(
        "lf_entries",
        _lf_entries,
        r"^inode {dir} leaf {leaf}: lf_entries is \d+ but the leaf has \d+ entries$",
        r"Leaf {leaf} \(0x[0-9a-f]+\) entry count in directory {dir} .* does not match",
    ),
    Fault(
        "chained_leaf_lf_entries",
        _chained_lf_entries,
        r"^inode {dir} leaf {leaf}: lf_entries is \d+ but the leaf has \d+ entries$",
        r"Leaf {leaf} \(0x[0-9a-f]+\) entry count in directory {dir} .* does not match",
    ),
    Fault(
        "lf_depth",
        _lf_depth,
        r"^inode {dir} leaf {leaf}: lf_depth 5 does not match its 16 hash table slot\(s\)",
    ),
    Fault(
        "di_entries",
        _di_entries,
        r"^inode {dir}: di_entries is 303 but found 302 entries$",
        r"Entries is 303 - should be 302",
    ),
    Fault(
        "dirent_formal",
        _formal,
        r"^inode {dir} \(root\) offset {off}: entry 'sub' has formal inode number \d+, but "
        r"inode \d+ has \d+$",
        r"wrong 'formal' inode number",
    ),
    Fault(
        "dirent_type",
        _de_type,
        r"^inode {dir} offset {off}: entry 'inner' has type 4 but inode \d+ has type 8$",
        r"conflicts with",
    ),
    Fault(
        "duplicate_block",
        _duplicate,
        r"^block {block}: claimed twice, by inodes {a} and {b}$",
        r"[Dd]uplicate",
    ),
    Fault(
        "indirect_block_type",
        _in_type,
        r"^inode {ino}: block {block} at height 1 should be an indirect \(IN\) block but has LF$",
    ),
    Fault(
        "jd_block_type",
        _jd_type,
        r"^inode {ino}: hash table block {block} should be JD but has LF$",
    ),
    Fault(
        "ed_block_type",
        _ed_type,
        r"^inode {ino}: block {block} should be an ED block but has LF$",
    ),
    Fault(
        "orphan",
        _orphan,
        r"^inode {inner}: is not named by any directory entry \(nlink 1, size 0\)$",
        r"[Uu]nlinked inode|lost\+found|Link count",
    ),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_fault_in_populated_image(fault: Fault, populated_image: tuple[Path, Populated]) -> None:
    image, layout = populated_image
    values = fault.inject(Image(image), layout)
    oracle = run_fsck_gfs2(image)
    assert oracle.returncode != 0, "fsck.gfs2 did not notice: the injection is not real"
    if fault.oracle:
        want = fault.oracle.format(**values) if "{" in fault.oracle else fault.oracle
        assert re.search(want, oracle.stdout + oracle.stderr), oracle.stdout + oracle.stderr
    before = image_digest(image)

    result = run_fsck_here("-n", image)

    assert result.returncode == 4, result.stdout + result.stderr
    pattern = fault.expect.format(**values)
    assert re.search(pattern, result.stdout, re.M), f"{pattern!r} not in:\n{result.stdout}"
    assert image_digest(image) == before
