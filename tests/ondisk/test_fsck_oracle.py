"""fsck.gfs2 judges structures made by our encoders.

An image from mkfs.gfs2 is extended with hashed directories (stuffed and JD-block
hash tables), hard links, a file with IN blocks, stuffed and unstuffed xattrs (EA,
EA-indirect, ED blocks), a symlink and a device, all encoded by gfspy.ondisk. The
real fsck.gfs2 must find nothing to say, and `fsck.gfs2 -y` must not change a byte.
A hand-written journal transaction then checks the log encoders the same way.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from gfspy.ondisk import constants as C
from gfspy.ondisk.dinode import Dinode
from gfspy.ondisk.directory import (
    Dirent,
    Leaf,
    add_dirent,
    hash_index,
    iter_dirents,
    live_dirents,
    remove_dirent,
    unpack_hash_table,
)
from gfspy.ondisk.indirect import unpack_indirect_block
from gfspy.ondisk.journal import LogDescriptor, LogHeader, pack_revokes
from gfspy.ondisk.meta import Inum
from gfspy.ondisk.xattr import EARecord, add_ea_record, remove_ea_record

from .conftest import ImageSpec, run_fsck
from .imageedit import Allocation, Child, ImageEditor, XattrSpec
from .imagewalk import WalkResult, walk_image

# What a clean `fsck.gfs2 -n` prints; anything else is a complaint.
CLEAN_LINE = re.compile(
    r"^(Initializing fsck|Validating resource group index\."
    r"|Level 1 resource group check: Checking if all rgrp and rindex values are good\."
    r"|\(level 1 passed\)|Starting (pass\w+|check_statfs)|Reconciling bitmaps\."
    r"|\w+ completed in [0-9.]+s|fsck\.gfs2 complete|\d+ percent complete\.)$"
)

BIG_XATTR = bytes(range(256)) * 40  # 10240 bytes: three ED blocks at 4 KiB


def complaints(result) -> list[str]:
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.strip() and not CLEAN_LINE.match(line.strip())]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as image:
        while chunk := image.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def populate(path: Path) -> dict[str, int]:
    """Add our own structures to a fresh image; returns names -> dinode addresses."""
    editor = ImageEditor(path)
    small_owner, big_owner, link_owner, dev_owner = (Allocation() for _ in range(4))
    big_dir_owner, mid_dir_owner = Allocation(), Allocation()
    small = editor.alloc_inum(small_owner)
    big_dir = editor.alloc_inum(big_dir_owner)
    mid_dir = editor.alloc_inum(mid_dir_owner)
    root = editor.walk.sb.root_dir

    big_names = [Child(f"entry-{i:04d}".encode(), small, C.DT_REG) for i in range(600)]
    mid_names = [Child(f"m{i}".encode(), small, C.DT_REG) for i in range(40)]
    # depth 10 -> an 8 KiB table in JD blocks; depth 8 -> a 2 KiB table in the dinode.
    editor.exhash_dir(big_dir, big_dir_owner, root, big_names, depth=10, leaf_bits=4)
    editor.exhash_dir(mid_dir, mid_dir_owner, root, mid_names, depth=8, leaf_bits=1)
    editor.small_file(
        small,
        small_owner,
        b"hello from gfspy\n",
        nlink=len(big_names) + len(mid_names),
        xattrs=[XattrSpec(C.EATYPE_USR, b"comment", b"stuffed value")],
    )
    big = editor.alloc_inum(big_owner)
    editor.big_file(
        big,
        big_owner,
        2_000_000,
        xattrs=[
            XattrSpec(C.EATYPE_USR, b"big", BIG_XATTR),
            XattrSpec(C.EATYPE_SECURITY, b"label", b"system_u:object_r:etc_t"),
        ],
    )
    link = editor.alloc_inum(link_owner)
    editor.simple_inode(link, link_owner, 0o120777, b"big/entry-0001")
    dev = editor.alloc_inum(dev_owner)
    editor.simple_inode(dev, dev_owner, 0o20644, major=1, minor=3)
    editor.add_to_root(
        [
            Child(b"big", big_dir, C.DT_DIR),
            Child(b"mid", mid_dir, C.DT_DIR),
            Child(b"data.bin", big, C.DT_REG),
            Child(b"link", link, C.DT_LNK),
            Child(b"null", dev, C.DT_CHR),
        ]
    )
    editor.close()
    return {"big": big_dir.addr, "mid": mid_dir.addr, "small": small.addr, "data": big.addr}


@pytest.mark.timeout(120)
def test_fsck_accepts_structures_we_encode(gfs2_image_copy: Callable[..., Path]) -> None:
    image = gfs2_image_copy(ImageSpec())
    addresses = populate(image)

    checked = run_fsck(image, "-n")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert complaints(checked) == []

    before = sha256(image)
    repaired = run_fsck(image, "-y")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert sha256(image) == before, "fsck -y changed an image it found clean"

    # Our own decoders read it all back, and the bitmaps match what is reachable.
    result = walk_image(image, strict_layout=False)
    assert result.paths["root/big"] == addresses["big"]
    assert result.counts["LF"] == 16 + 2 and result.counts["JD"] == 3
    assert result.counts["EA"] == 2 and result.counts["ED"] == 3
    assert result.counts["EA indirect"] == 1
    assert result.files["root/data.bin@xattr:big"] == BIG_XATTR
    assert result.dinodes[addresses["small"]].nlink == 640
    assert result.dinodes[addresses["data"]].height == 2


@pytest.mark.timeout(120)
def test_fsck_notices_a_single_wrong_hash(gfs2_image_copy: Callable[..., Path]) -> None:
    """The oracle is sensitive: one bad de_hash in one of our leaves is reported."""
    image = gfs2_image_copy(ImageSpec())
    addresses = populate(image)
    walk = walk_image(image, strict_layout=False)
    bsize = walk.sb.bsize
    with open(image, "r+b") as f:
        f.seek(addresses["mid"] * bsize)
        table = Dinode.payload(f.read(bsize))
        leaf_addr = struct.unpack_from(">Q", table, 0)[0]
        f.seek(leaf_addr * bsize)
        block = bytearray(f.read(bsize))
        Leaf.unpack(block)
        offset, dirent = next(
            (o, d) for o, d in iter_dirents(block, Leaf.SIZE, bsize) if d.name.startswith(b"m")
        )
        struct.pack_into(">I", block, offset + 16, dirent.hash ^ 1)
        f.seek(leaf_addr * bsize)
        f.write(block)
    checked = run_fsck(image, "-n")
    assert any("hash" in line.lower() for line in complaints(checked)), checked.stdout


def rewrite_links(image: Path, dir_addr: int, file_addr: int) -> tuple[int, int]:
    """Remove some hard links from a hashed directory (among them a leaf's first
    record) and add new ones, with add_dirent/remove_dirent; fix every count.
    Returns (links removed, links added)."""
    bsize = 4096
    with open(image, "r+b") as f:

        def read(addr: int) -> bytearray:
            f.seek(addr * bsize)
            return bytearray(f.read(bsize))

        def write(addr: int, data: bytes | bytearray) -> None:
            f.seek(addr * bsize)
            f.write(data)

        dir_block = read(dir_addr)
        directory = Dinode.unpack(dir_block)
        table = unpack_hash_table(Dinode.payload(dir_block), directory.depth)
        leaves = {addr: read(addr) for addr in dict.fromkeys(table)}
        removed = 0
        for block in leaves.values():
            links = [
                (offset, d)
                for offset, d in live_dirents(block, Leaf.SIZE, bsize)
                if d.name not in (b".", b"..")
            ]
            victims = links[:1] + links[3:5]  # first record of the leaf, then two more
            for offset, _ in reversed(victims):  # later first: offsets stay valid
                remove_dirent(block, Leaf.SIZE, bsize, offset)
            assert any(offset == Leaf.SIZE for offset, _ in victims)
            removed += len(victims)
        added = 0
        for i in range(6):
            dirent = Dirent.make(f"added-{i}".encode(), Inum(0, 0), C.DT_REG)
            target = table[hash_index(dirent.hash, directory.depth)]
            small = Dinode.unpack(read(file_addr))
            dirent.inum = small.inum
            assert add_dirent(leaves[target], Leaf.SIZE, bsize, dirent) is not None
            added += 1
        for addr, block in leaves.items():
            leaf = Leaf.unpack(block)
            leaf.entries = sum(1 for _ in live_dirents(block, Leaf.SIZE, bsize))
            leaf.pack_into(block)
            write(addr, block)
        directory.entries += added - removed
        directory.pack_into(dir_block)
        write(dir_addr, dir_block)
        file_block = read(file_addr)
        small = Dinode.unpack(file_block)
        small.nlink += added - removed
        small.pack_into(file_block)
        write(file_addr, file_block)
    return removed, added


@pytest.mark.timeout(120)
def test_fsck_accepts_dirent_removal_and_insertion(
    gfs2_image_copy: Callable[..., Path],
) -> None:
    image = gfs2_image_copy(ImageSpec())
    addresses = populate(image)
    removed, added = rewrite_links(image, addresses["mid"], addresses["small"])
    assert (removed, added) == (6, 6)

    checked = run_fsck(image, "-n")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert complaints(checked) == []
    result = walk_image(image, strict_layout=False)
    names = {path.rsplit("/", 1)[-1] for path in result.paths}
    assert "added-0" not in names  # hard links to a visited inode are not re-recorded
    assert result.dinodes[addresses["small"]].nlink == 640


@pytest.mark.timeout(120)
def test_fsck_accepts_xattr_edits(gfs2_image_copy: Callable[..., Path]) -> None:
    """add_ea_record/remove_ea_record on blocks we wrote: a stuffed record replaced
    by two new ones, and an unstuffed one removed with its ED blocks freed."""
    image = gfs2_image_copy(ImageSpec())
    addresses = populate(image)
    editor = ImageEditor(image)
    bsize = editor.bsize

    small = Dinode.unpack(editor.read(addresses["small"]))
    block = bytearray(editor.read(small.eattr))
    assert remove_ea_record(block, 24).name == b"comment"
    for ea_type, name, value in [
        (C.EATYPE_USR, b"a", b"1" * 100),
        (C.EATYPE_TRUSTED, b"b", b"2" * 7),
    ]:
        record = EARecord(0, len(value), len(name), ea_type, name=name, value=value)
        assert add_ea_record(block, record) is not None
    editor.write(small.eattr, bytes(block))

    data_raw = editor.read(addresses["data"])
    data = Dinode.unpack(data_raw)
    ea_addr = unpack_indirect_block(editor.read(data.eattr))[0]
    block = bytearray(editor.read(ea_addr))
    removed = remove_ea_record(block, 24)
    assert removed.name == b"big" and len(removed.pointers) == 3
    for ed in removed.pointers:
        editor.free(ed)
    editor.write(ea_addr, bytes(block))
    data.blocks -= len(removed.pointers)
    editor.write(data.addr, data.pack_block(bsize, Dinode.payload(data_raw)))
    editor.close()

    checked = run_fsck(image, "-n")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert complaints(checked) == []
    result = walk_image(image, strict_layout=False)
    assert result.counts["ED"] == 0 and "root/data.bin@xattr:big" not in result.files


def journal_head(image: Path, journal: list[int], bsize: int = 4096) -> LogHeader:
    """The valid log header with the highest sequence in a journal."""
    headers = []
    with open(image, "rb") as f:
        for addr in journal:
            f.seek(addr * bsize)
            block = f.read(bsize)
            if LogHeader.verify(block):
                headers.append(LogHeader.unpack(block))
    return max(headers, key=lambda header: header.sequence)


def write_transaction(image: Path, walk: WalkResult, revoke: bool) -> tuple[int, int, int]:
    """Log a changed copy of the root dinode in journal0 (and, if `revoke`, revoke it
    in a second transaction). Returns (root address, mode in the logged copy, last
    sequence number written)."""
    bsize = walk.sb.bsize
    journal = walk.journal_blocks["master/jindex/journal0"]
    head = walk.journal_heads["master/jindex/journal0"]
    jinode = walk.paths["master/jindex/journal0"]
    root_addr = walk.sb.root_dir.addr
    with open(image, "r+b") as f:
        f.seek(root_addr * bsize)
        root_block = bytearray(f.read(bsize))
    root = Dinode.unpack(root_block)
    root.mode = 0o40700
    logged = root.pack_block(bsize, Dinode.payload(root_block))

    blocks: list[bytes] = [LogDescriptor.metadata([root_addr]).pack_block(bsize), logged]
    sequence = head.sequence + 1
    first = (head.blkno + 1) % len(journal)

    def header_at(position: int, seq: int) -> bytes:
        return LogHeader(
            sequence=seq,
            flags=C.LH_FLUSH_NORMAL,
            tail=first,
            blkno=position,
            addr=journal[position],
            jinode=jinode,
        ).pack_block(bsize)

    blocks.append(header_at((first + 2) % len(journal), sequence))
    if revoke:
        sequence += 1
        blocks += pack_revokes(bsize, [root_addr])
        blocks.append(header_at((first + len(blocks)) % len(journal), sequence))
    with open(image, "r+b") as f:
        for index, block in enumerate(blocks):
            f.seek(journal[(first + index) % len(journal)] * bsize)
            f.write(block)
    return root_addr, root.mode, sequence


@pytest.mark.timeout(120)
@pytest.mark.parametrize("revoke", [False, True], ids=["replayed", "revoked"])
def test_fsck_replays_our_journal_transaction(
    gfs2_image_copy: Callable[..., Path], revoke: bool
) -> None:
    image = gfs2_image_copy(ImageSpec(journals=2))
    walk = walk_image(image)
    journal = walk.journal_blocks["master/jindex/journal0"]
    root_addr, logged_mode, last_sequence = write_transaction(image, walk, revoke)

    assert not journal_head(image, journal).is_clean
    checked = run_fsck(image, "-n")
    assert "dirty" in checked.stdout + checked.stderr

    repaired = run_fsck(image, "-y")
    output = repaired.stdout + repaired.stderr
    assert repaired.returncode in (0, 1), output
    expected = "Replayed 0 of 1" if revoke else "Replayed 1 of 1"
    assert expected in output, output
    bsize = 4096
    with open(image, "rb") as f:
        f.seek(root_addr * bsize)
        root = Dinode.unpack(f.read(bsize))
    assert (root.mode == logged_mode) is not revoke
    # fsck marked the journal clean with a header of its own (lh_crc 0), which our
    # decoder must accept as the new head.
    head = journal_head(image, journal)
    assert head.is_clean and head.sequence == last_sequence + 1
    final = run_fsck(image, "-n")
    assert "dirty" not in final.stdout + final.stderr
