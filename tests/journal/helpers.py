"""Shared helpers for the journal tests: real images from mkfs.gfs2, the real
fsck.gfs2 as the oracle, and small readers for picking blocks to journal."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from gfspy.blockdev.device import Device
from gfspy.blockdev.local import LocalDevice
from gfspy.journal.extent import JournalExtents, map_journal
from gfspy.journal.locate import JournalFiles, locate_journal, lookup, read_superblock
from gfspy.ondisk.constants import BLKST_FREE, DINODE_SIZE, METATYPE_IN, RINDEX_ENTRY_SIZE
from gfspy.ondisk.dinode import Dinode
from gfspy.ondisk.indirect import unpack_pointers
from gfspy.ondisk.meta import MetaHeader
from gfspy.ondisk.rgrp import RindexEntry, extract_bitmap, get_state

IMAGE_MIB = 24
BSIZE = 4096


def make_image(
    path: Path,
    size_mib: int = IMAGE_MIB,
    journals: int = 1,
    tool: str = "mkfs.gfs2",
    bsize: int = BSIZE,
) -> Path:
    """A fresh lock_nolock filesystem made by the real mkfs.gfs2 (or by gfspy-mkfs)."""
    with open(path, "wb") as f:
        f.truncate(size_mib << 20)
    command = ["mkfs.gfs2"] if tool == "mkfs.gfs2" else [sys.executable, "-m", "gfspy.mkfs"]
    subprocess.run(
        [*command, "-O", "-p", "lock_nolock", "-b", str(bsize), "-j", str(journals), str(path)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return path


@dataclass
class FsckRun:
    returncode: int
    output: str

    @property
    def dirty(self) -> bool:
        return "is dirty" in self.output


def fsck(path: Path, mode: str) -> FsckRun:
    """Run the real fsck.gfs2 (`-n` or `-y`); output is stdout and stderr together."""
    proc = subprocess.run(
        ["fsck.gfs2", mode, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
    )
    return FsckRun(proc.returncode, proc.stdout)


def normalized(output: str) -> list[str]:
    """fsck output without timings, for comparing two runs line by line."""
    return [re.sub(r"[0-9.]+s$", "", line) for line in output.splitlines() if line.strip()]


_baseline: dict[str, list[str]] = {}


def assert_fsck_silent(path: Path, tmp_dir: Path) -> None:
    """fsck.gfs2 -n exits 0 and says nothing a pristine mkfs image does not say."""
    if "lines" not in _baseline:
        pristine = make_image(tmp_dir / "pristine-for-fsck.img")
        base = fsck(pristine, "-n")
        assert base.returncode == 0, base.output
        _baseline["lines"] = normalized(base.output)
        pristine.unlink()
    run = fsck(path, "-n")
    assert run.returncode == 0, run.output
    assert normalized(run.output) == _baseline["lines"], run.output


def replay_counts(output: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """((metadata replayed, logged), (jdata replayed, logged)) from fsck -y output."""
    meta = re.search(r"Replayed (\d+) of (\d+) metadata blocks", output)
    jdata = re.search(r"Replayed (\d+) of (\d+) journaled data blocks", output)
    assert meta and jdata, output
    return (int(meta[1]), int(meta[2])), (int(jdata[1]), int(jdata[2]))


def read_block(path: Path, blkno: int, bsize: int = BSIZE) -> bytes:
    with open(path, "rb") as f:
        f.seek(blkno * bsize)
        return f.read(bsize)


async def open_device(path: Path) -> LocalDevice:
    return await LocalDevice.open(str(path))


async def journal0(device: Device) -> tuple[JournalFiles, JournalExtents]:
    files = await locate_journal(device, 0)
    return files, await map_journal(device, files.bsize, files.journal)


async def root_dinode(device: Device) -> tuple[int, bytes]:
    sb = await read_superblock(device)
    addr = sb.root_dir.addr
    return addr, await device.read(addr * BSIZE, BSIZE)


def touched_root(image: bytes, mode: int, mtime: int) -> bytes:
    """The root dinode with a new permission mode and mtime (a valid change)."""
    raw = bytearray(image)
    di = Dinode.unpack(raw)
    struct.pack_into(">I", raw, 40, (di.mode & ~0o7777) | mode)
    struct.pack_into(">q", raw, 80, mtime)
    return bytes(raw)


async def last_rgrp(device: Device) -> tuple[RindexEntry, list[bytes]]:
    """The last resource group's rindex entry and its RG/RB blocks."""
    sb = await read_superblock(device)
    bs = sb.bsize
    rindex_addr = await lookup(device, bs, sb.master_dir.addr, "rindex")
    assert rindex_addr is not None
    raw = await device.read(rindex_addr * bs, bs)
    di = Dinode.unpack(raw)
    if di.height == 0:
        data = raw[DINODE_SIZE:]
    else:  # small blocks: rindex spills into data blocks
        assert di.height == 1, "test images keep rindex within one tree level"
        ptrs = [p for p in unpack_pointers(raw, DINODE_SIZE, (bs - DINODE_SIZE) // 8) if p]
        data = b"".join([await device.read(p * bs, bs) for p in ptrs])
    entries = [
        RindexEntry.unpack(data, i * RINDEX_ENTRY_SIZE) for i in range(di.size // RINDEX_ENTRY_SIZE)
    ]
    rg = entries[-1]
    blocks = [await device.read(b * bs, bs) for b in range(rg.addr, rg.addr + rg.length)]
    return rg, blocks


async def free_blocks(device: Device, count: int, spacing: int = 2) -> list[int]:
    """`count` blocks the bitmaps of the last rgrp mark free, `spacing` apart (so
    in-place writes of them are separate I/Os)."""
    rg, blocks = await last_rgrp(device)
    bitmap = extract_bitmap(blocks, len(blocks[0]), rg.bitbytes)
    found: list[int] = []
    n = rg.data - 1
    while len(found) < count and n >= 0:
        if get_state(bitmap, n) == BLKST_FREE:
            found.append(rg.data0 + n)
            n -= spacing
        else:
            n -= 1
    assert len(found) == count
    return sorted(found)


def metadata_block(blkno: int, tag: int, bsize: int = BSIZE) -> bytes:
    """A recognisable metadata image (IN header, then a pattern naming block and tag)."""
    body = struct.pack(">QQ", blkno, tag) * ((bsize - 24) // 16)
    return MetaHeader.for_type(METATYPE_IN).pack() + body + bytes(bsize - 24 - len(body))


def data_block(tag: int, *, starts_with_magic: bool = False, bsize: int = BSIZE) -> bytes:
    """A journaled-data image; with `starts_with_magic` it exercises escaping."""
    head = struct.pack(">I", 0x01161970) if starts_with_magic else b"DATA"
    return (head + struct.pack(">Q", tag) * ((bsize - 4) // 8)).ljust(bsize, b"\0")


# ---------------------------------------------------------------- crash simulation


@dataclass
class RecordingDevice(Device):
    """A real device that also remembers each write, grouped by flush epochs."""

    inner: LocalDevice
    epochs: list[list[tuple[int, bytes]]] = field(default_factory=lambda: [[]])

    def __post_init__(self) -> None:
        self.size = self.inner.size
        self.block_size = self.inner.block_size
        self.name = self.inner.name

    async def read(self, offset: int, length: int) -> bytes:
        return await self.inner.read(offset, length)

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        # Record block by block: a multi-block write may be torn by a power cut.
        raw = bytes(data)
        for at in range(0, len(raw), BSIZE):
            self.epochs[-1].append((offset + at, raw[at : at + BSIZE]))
        await self.inner.write(offset, data)

    async def flush(self) -> None:
        await self.inner.flush()
        self.epochs.append([])

    async def aclose(self) -> None:
        await self.inner.aclose()


def crash_states(
    epochs: list[list[tuple[int, bytes]]],
) -> list[tuple[str, list[tuple[int, bytes]]]]:
    """Every write set a crash could leave on disk, as (label, writes to apply)."""
    states = []
    durable: list[tuple[int, bytes]] = []
    for e, pending in enumerate(epochs):
        for k in range(len(pending) + 1):
            states.append((f"epoch {e}, first {k} of {len(pending)} writes", durable + pending[:k]))
        if len(pending) > 1:
            states.append((f"epoch {e}, only the last write", durable + pending[-1:]))
            states.append((f"epoch {e}, all but the first write", durable + pending[1:]))
        durable = durable + pending
    return states


def build_image(base: Path, writes: list[tuple[int, bytes]], out: Path) -> Path:
    shutil.copyfile(base, out)
    with open(out, "r+b") as f:
        for offset, data in writes:
            f.seek(offset)
            f.write(data)
    return out
