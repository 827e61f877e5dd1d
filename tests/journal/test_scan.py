"""Journal head finding: the pure scanner on hand-built logs, and the trio reader on
the journals of a real mkfs.gfs2 image."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from gfspy.blockdev import open_device
from gfspy.journal.scan import JournalScanner, scan_blocks, scan_journal
from gfspy.ondisk.constants import (
    DINODE_SIZE,
    LH_UNMOUNT,
    LH_USERSPACE,
    SB_OFFSET,
    Geometry,
)
from gfspy.ondisk.dinode import Dinode
from gfspy.ondisk.directory import iter_dirents
from gfspy.ondisk.indirect import unpack_pointers
from gfspy.ondisk.journal import LogDescriptor, LogHeader
from gfspy.ondisk.superblock import Superblock

BS = 512
N = 64


def header(pos: int, seq: int, flags: int = LH_UNMOUNT | LH_USERSPACE, crc: bool = True) -> bytes:
    return LogHeader(sequence=seq, flags=flags, tail=0, blkno=pos).pack_block(BS, with_crc=crc)


def mkfs_ring(start_seq: int, n: int = N) -> list[bytes]:
    """A journal as mkfs writes it: a header in every block, sequences rising from
    `start_seq` at block 0 and wrapping to 0 after n-1."""
    return [header(pos, (start_seq + pos) % n) for pos in range(n)]


def scan(blocks: list[bytes]):
    return scan_blocks([b"".join(blocks)], len(blocks), BS)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("start", [0, 1, 17, N - 1])
def test_mkfs_ring_head_is_at_the_wrap(start: int) -> None:
    result = scan(mkfs_ring(start))
    assert result.head is not None
    assert result.head.sequence == N - 1
    assert result.head.position == (N - 1 - start) % N
    assert result.clean
    assert result.descents == 1 and result.out_of_order == 0
    assert not result.bad_headers and not result.duplicate_sequences


@pytest.mark.timeout(10)
def test_head_without_unmount_is_dirty() -> None:
    blocks = mkfs_ring(10)
    head_pos = N - 1 - 10
    # A transaction after the last clean header: a descriptor, a logged block, and
    # a header without UNMOUNT. Blocks after it keep older sequences, as on disk.
    blocks[head_pos + 1] = LogDescriptor.metadata([1234]).pack_block(BS)
    blocks[head_pos + 2] = bytes(BS)
    blocks[head_pos + 3] = header(head_pos + 3, N + 5, flags=0x2)
    result = scan(blocks)
    assert result.head is not None
    assert (result.head.position, result.head.sequence) == (head_pos + 3, N + 5)
    assert not result.clean
    assert result.descents == 1


@pytest.mark.timeout(10)
def test_damaged_headers_are_reported_and_ignored() -> None:
    blocks = [bytearray(b) for b in mkfs_ring(5)]
    head_pos = N - 1 - 5
    blocks[3][48] ^= 0x80  # lh_crc
    blocks[head_pos][24 + 7] ^= 0x01  # the head's sequence: lh_hash no longer matches
    result = scan([bytes(b) for b in blocks])
    reasons = {b.position: b.reason for b in result.bad_headers}
    assert set(reasons) == {3, head_pos}
    assert reasons[3].startswith("bad lh_crc 0x")
    assert reasons[head_pos].startswith("bad lh_hash 0x")
    # The damaged head does not count: the previous header becomes the head.
    assert result.head is not None and result.head.position == head_pos - 1
    assert result.head.sequence == N - 2


@pytest.mark.timeout(10)
def test_header_without_crc_is_valid() -> None:
    """fsck.gfs2 writes its post-replay header with lh_crc 0 ("v1" header)."""
    blocks = mkfs_ring(0)
    blocks[N - 1] = header(N - 1, N - 1, crc=False)
    result = scan(blocks)
    assert not result.bad_headers
    assert result.head is not None and result.head.position == N - 1


@pytest.mark.timeout(10)
def test_wrong_blkno_is_a_bad_header() -> None:
    blocks = mkfs_ring(0)
    blocks[7] = header(8, 7)
    result = scan(blocks)
    assert [(b.position, b.reason) for b in result.bad_headers] == [
        (7, "lh_blkno is 8, expected 7")
    ]


@pytest.mark.timeout(10)
def test_duplicate_and_disordered_sequences() -> None:
    blocks = mkfs_ring(0)
    blocks[10] = header(10, 40)  # 40 also lives at block 40; and 9 -> 40 -> 11 descends
    result = scan(blocks)
    assert result.duplicate_sequences == {40: [10, 40]}
    assert result.descents == 2 and result.out_of_order == 1


@pytest.mark.timeout(10)
def test_no_headers_means_no_head() -> None:
    result = scan([bytes(BS)] * N)
    assert result.head is None and not result.clean and result.descents == 0


@pytest.mark.timeout(10)
def test_feeding_in_any_chunking_gives_the_same_result() -> None:
    blocks = mkfs_ring(23)
    whole = scan(blocks)
    scanner = JournalScanner(N, BS)
    data = b"".join(blocks)
    cuts = [0, BS, 4 * BS, 5 * BS, 33 * BS, N * BS]
    for a, b in zip(cuts, cuts[1:], strict=False):
        scanner.feed(data[a:b])
    assert scanner.finish() == whole


@pytest.mark.timeout(10)
def test_scanner_rejects_partial_input() -> None:
    scanner = JournalScanner(N, BS)
    with pytest.raises(ValueError):
        scanner.feed(bytes(BS + 1))
    scanner.feed(bytes(BS))
    with pytest.raises(ValueError):
        scanner.finish()


def _journal_extents(image: Path) -> list[tuple[str, int, list[tuple[int, int]]]]:
    """(name, dinode block, extents) of every journal, decoded with gfspy.ondisk."""
    raw = image.read_bytes()
    sb = Superblock.unpack(raw, SB_OFFSET)
    bs = sb.bsize
    geo = Geometry.for_bsize(bs)

    def block(n: int) -> bytes:
        return raw[n * bs : (n + 1) * bs]

    def entries(addr: int) -> dict[bytes, int]:
        return {
            d.name: d.inum.addr
            for _, d in iter_dirents(block(addr), DINODE_SIZE, bs)
            if not d.is_sentinel()
        }

    jindex = entries(entries(sb.master_dir.addr)[b"jindex"])
    out = []
    for name, addr in sorted(jindex.items()):
        if not name.startswith(b"journal"):
            continue
        di = Dinode.unpack(block(addr))
        ptrs = [p for p in unpack_pointers(block(addr), DINODE_SIZE, geo.diptrs) if p]
        for _ in range(di.height - 1):
            ptrs = [q for p in ptrs for q in unpack_pointers(block(p), 24, geo.inptrs) if q]
        extents: list[tuple[int, int]] = []
        for p in ptrs:
            if extents and sum(extents[-1]) == p:
                extents[-1] = (extents[-1][0], extents[-1][1] + 1)
            else:
                extents.append((p, 1))
        out.append((name.decode(), addr, extents))
    return out


@pytest.mark.timeout(60)
async def test_scan_journal_on_a_mkfs_image(tmp_path: Path) -> None:
    image = tmp_path / "gfs2.img"
    subprocess.run(["truncate", "-s", "128M", str(image)], check=True)
    subprocess.run(
        ["mkfs.gfs2", "-O", "-b", "1024", "-j", "2", "-p", "lock_nolock", str(image)],
        check=True,
        capture_output=True,
    )
    journals = _journal_extents(image)
    assert [name for name, _, _ in journals] == ["journal0", "journal1"]
    raw = image.read_bytes()
    device = await open_device(str(image), readonly=True)
    async with device:
        for _name, _addr, extents in journals:
            result = await scan_journal(device, extents, 1024, batch_blocks=1000)
            blocks = [b for s, n in extents for b in range(s, s + n)]
            # The expected head, computed independently: the highest sequence.
            seqs = [LogHeader.unpack(raw[b * 1024 : (b + 1) * 1024]).sequence for b in blocks]
            want = max(range(len(seqs)), key=seqs.__getitem__)
            assert result.blocks == len(blocks)
            assert len(result.headers) == len(blocks)
            assert result.head is not None and result.head.position == want
            assert result.head.sequence == len(blocks) - 1
            assert result.clean and result.descents == 1
            assert not result.bad_headers and not result.duplicate_sequences
