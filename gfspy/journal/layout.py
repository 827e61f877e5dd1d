"""Laying a transaction out as log blocks (pure; no I/O).

Order, as the kernel writes it and replay expects it: JDATA descriptors with their
escaped copies, then METADATA descriptors with their copies sorted by block number,
then one REVOKE descriptor with its continuation blocks. The log header that commits
them is built separately because its tail and position are only known at write time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gfspy.ondisk.constants import LOG_DESCRIPTOR_SIZE
from gfspy.ondisk.journal import (
    LogDescriptor,
    LogHeader,
    escape_jdata,
    pack_revokes,
    revoke_blocks_needed,
)


@dataclass(slots=True)
class LogBody:
    """The blocks of one transaction before its header, in log order."""

    blocks: list[bytes] = field(default_factory=list)
    #: In-place block -> index in `blocks` of its copy.
    copies: dict[int, int] = field(default_factory=dict)
    revokes: list[int] = field(default_factory=list)


def log_blocks_needed(bsize: int, jdata: int, metadata: int, revokes: int) -> int:
    """Log blocks (descriptors, copies and the header) a transaction will take."""
    pairs_per_ld = (bsize - LOG_DESCRIPTOR_SIZE) // 16
    ptrs_per_ld = (bsize - LOG_DESCRIPTOR_SIZE) // 8
    total = jdata + -(-jdata // pairs_per_ld) + metadata + -(-metadata // ptrs_per_ld) + 1
    if revokes:
        total += revoke_blocks_needed(bsize, revokes)
    return total


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def build_log_body(
    bsize: int,
    jdata: dict[int, bytes],
    metadata: dict[int, bytes],
    revokes: list[int],
) -> LogBody:
    """Descriptors and copies for one transaction (revokes already filtered)."""
    body = LogBody(revokes=list(revokes))
    pairs_per_ld = (bsize - LOG_DESCRIPTOR_SIZE) // 16
    ptrs_per_ld = (bsize - LOG_DESCRIPTOR_SIZE) // 8
    for chunk in _chunks(sorted(jdata), pairs_per_ld):
        copies = [escape_jdata(jdata[b]) for b in chunk]
        body.blocks.append(LogDescriptor.jdata(chunk, [esc for _, esc in copies]).pack_block(bsize))
        for blkno, (copy, _) in zip(chunk, copies, strict=True):
            body.copies[blkno] = len(body.blocks)
            body.blocks.append(copy)
    for chunk in _chunks(sorted(metadata), ptrs_per_ld):
        body.blocks.append(LogDescriptor.metadata(chunk).pack_block(bsize))
        for blkno in chunk:
            body.copies[blkno] = len(body.blocks)
            body.blocks.append(metadata[blkno])
    if revokes:
        body.blocks.extend(pack_revokes(bsize, sorted(revokes)))
    return body


def build_log_header(
    bsize: int,
    *,
    jid: int,
    sequence: int,
    flags: int,
    tail: int,
    blkno: int,
    sec: int = 0,
    nsec: int = 0,
    addr: int = 0,
    jinode: int = 0,
    statfs_addr: int = 0,
    quota_addr: int = 0,
    local: tuple[int, int, int] = (0, 0, 0),
    with_crc: bool = True,
) -> bytes:
    """One complete log-header block with both checksums."""
    header = LogHeader(
        sequence=sequence,
        flags=flags,
        tail=tail,
        blkno=blkno,
        nsec=nsec,
        sec=sec,
        addr=addr,
        jinode=jinode,
        statfs_addr=statfs_addr,
        quota_addr=quota_addr,
        local_total=local[0],
        local_free=local[1],
        local_dinodes=local[2],
        jid=jid,
    )
    return header.pack_block(bsize, with_crc=with_crc)
