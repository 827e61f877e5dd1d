"""Field-level check against a second decoder: gfs2_edit.

A byte-exact round trip cannot tell if two fields of the same size were swapped;
gfs2_edit (gfs2-utils) prints every field by name. Structures with a distinct value
in every field are encoded by us, written to free blocks of a real image, and the
values gfs2_edit reads back must be the ones we meant.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from gfspy.ondisk import constants as C
from gfspy.ondisk.dinode import Dinode
from gfspy.ondisk.directory import Leaf
from gfspy.ondisk.journal import LogDescriptor, LogHeader
from gfspy.ondisk.rgrp import RgrpHeader
from gfspy.ondisk.superblock import Superblock
from gfspy.ondisk.xattr import EARecord, pack_ea_block

from .conftest import ImageSpec

FIELD_LINE = re.compile(r"^  (\w+)\s+(\S+)")


def parse_value(text: str) -> int | str:
    """gfs2_edit prints decimal, "0x..(hex)", or the mode as "0100644(decimal)"
    (which is really octal)."""
    if text.endswith("(hex)"):
        return int(text[: -len("(hex)")], 16)
    if text.endswith("(decimal)"):
        return int(text[: -len("(decimal)")], 8)
    try:
        return int(text)
    except ValueError:
        return text


def gfs2_edit_blocks(image: Path, blocks: list[int | str]) -> list[list[tuple[str, int | str]]]:
    """Fields printed for each requested block, in order."""
    result = subprocess.run(
        ["gfs2_edit", "-p", *map(str, blocks), str(image.resolve())],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    sections = re.split(r"^Block #", result.stdout, flags=re.MULTILINE)[1:]
    assert len(sections) == len(blocks), result.stdout
    return [
        [(m.group(1), parse_value(m.group(2))) for m in map(FIELD_LINE.match, s.splitlines()) if m]
        for s in sections
    ]


def our_fields(prefix: str, structure: object, rename: dict[str, str] | None = None) -> dict:
    """gfs2_edit's names for our dataclass fields: prefix + name, unless renamed."""
    rename = rename or {}
    names = [n for n in structure.__dataclass_fields__ if not n.isupper()]
    return {rename.get(n, prefix + n): getattr(structure, n) for n in names}


def assert_fields(printed: list[tuple[str, int | str]], expected: dict, what: str) -> None:
    seen = dict(printed)
    compared = {name: seen[name] for name in expected if name in seen}
    assert compared == {name: expected[name] for name in compared}, what
    # Every field gfs2_edit shows for this structure (bar the header) was compared.
    shown = set(seen) - {"mh_magic", "mh_type", "mh_format"}
    assert shown <= set(expected), f"{what}: unexpected fields {shown - set(expected)}"


@pytest.mark.timeout(60)
def test_gfs2_edit_reads_our_fields(gfs2_image_copy: Callable[..., Path]) -> None:
    image = gfs2_image_copy(ImageSpec())
    bsize = 4096
    base = 60000  # free blocks near the end of the last rgrp
    dinode = Dinode(
        formal=5,
        addr=base,
        mode=0o100640,
        uid=1001,
        gid=1002,
        nlink=3,
        size=12,
        blocks=4,
        atime=1700000003,
        mtime=1700000004,
        ctime=1700000005,
        major=8,
        minor=9,
        goal_meta=61000,
        goal_data=61001,
        generation=42,
        flags=C.DIF_NOATIME | C.DIF_SYNC | C.DIF_EA_INDIRECT,
        payload_format=1500,
        height=1,
        depth=6,
        entries=17,
        eattr=62000,
        atime_nsec=11,
        mtime_nsec=12,
        ctime_nsec=13,
    )
    rgrp = RgrpHeader(
        flags=C.RGF_NOALLOC | C.RGF_TRIMMED,
        free=111,
        dinodes=222,
        skip=333,
        igeneration=444,
        data0=555,
        data=666,
        bitbytes=777,
    )
    log_header = LogHeader(
        sequence=0x1122334455,
        flags=C.LH_UNMOUNT | C.LH_RECOVERY | C.LH_USERSPACE,
        tail=7,
        blkno=9,
        nsec=123456,
        sec=1700000001,
        addr=base + 2,
        jinode=18,
        statfs_addr=4135,
        quota_addr=4136,
        local_total=-5,
        local_free=-6,
        local_dinodes=7,
        jid=2,
    )
    descriptor = LogDescriptor(C.LD_JDATA, 4, 3, 0, [11, 12, 13], [0, 1, 0])
    leaf = Leaf(depth=5, entries=0, next=77, inode=88, dist=3, nsec=99, sec=1700000002)
    record = EARecord(4072, 5, 4, C.EATYPE_SECURITY, C.EAFLAG_LAST, 0, b"mime", b"hello")
    blocks = [
        dinode.pack_block(bsize),
        rgrp.pack_block(bsize),
        log_header.pack_block(bsize),
        descriptor.pack_block(bsize),
        leaf.pack_block(bsize),
        pack_ea_block(bsize, [record]),
    ]
    with open(image, "r+b") as f:
        for index, block in enumerate(blocks):
            os.pwrite(f.fileno(), block, (base + index) * bsize)
    printed = gfs2_edit_blocks(image, [base + i for i in range(len(blocks))] + ["sb"])

    assert_fields(
        printed[0],
        our_fields("di_", dinode, {"formal": "no_formal_ino", "addr": "no_addr"}),
        "dinode",
    )
    assert_fields(printed[1], our_fields("rg_", rgrp), "rgrp header")
    assert_fields(printed[2], our_fields("lh_", log_header), "log header")
    assert_fields(
        printed[3],
        our_fields("ld_", descriptor, {"ld_type": "ld_type"}),
        "log descriptor",
    )
    assert_fields(printed[4], our_fields("lf_", leaf), "leaf")
    ea_expected = our_fields("ea_", record, {"name": "name"})
    ea_expected["name"] = record.name.decode()
    assert_fields(printed[5], ea_expected, "EA record")

    with open(image, "rb") as f:
        sb = Superblock.unpack(os.pread(f.fileno(), Superblock.SIZE, C.SB_OFFSET))
    sb_printed = printed[6]
    inums = [value for name, value in sb_printed if name in ("no_formal_ino", "no_addr")]
    assert inums == [sb.master_dir.formal, sb.master_dir.addr, sb.root_dir.formal, sb.root_dir.addr]
    sb_fields = dict(sb_printed)
    assert sb_fields["sb_fs_format"] == sb.fs_format
    assert sb_fields["sb_multihost_format"] == sb.multihost_format
    assert sb_fields["sb_bsize"] == sb.bsize and sb_fields["sb_bsize_shift"] == sb.bsize_shift
    assert sb_fields["sb_lockproto"] == sb.lockproto
    assert sb_fields["uuid"] == str(sb.uuid)
