"""Block-pointer arrays: the dinode pointer area and IN (indirect) blocks.

Also the mapping of a logical block to its path through the tree, since that is pure
arithmetic on the format's radix (inptrs at every level).
"""

from __future__ import annotations

import struct

from .constants import META_HEADER_SIZE, METATYPE_IN
from .errors import FormatError
from .meta import Buffer, MetaHeader, expect_header, need, pad_block

IN_HEADER_SIZE = META_HEADER_SIZE

_STRUCT_CACHE: dict[int, struct.Struct] = {}


def _pointer_struct(count: int) -> struct.Struct:
    packer = _STRUCT_CACHE.get(count)
    if packer is None:
        packer = struct.Struct(f">{count}Q")
        if len(_STRUCT_CACHE) < 256:
            _STRUCT_CACHE[count] = packer
    return packer


def unpack_pointers(buf: Buffer, offset: int, count: int) -> list[int]:
    """`count` big-endian u64 block pointers starting at `offset` (0 means a hole)."""
    if count < 0:
        raise ValueError(f"negative pointer count {count}")
    need(buf, offset, 8 * count, "pointer array")
    return list(_pointer_struct(count).unpack_from(buf, offset))


def pack_pointers(ptrs: list[int] | tuple[int, ...]) -> bytes:
    try:
        return _pointer_struct(len(ptrs)).pack(*ptrs)
    except struct.error as exc:
        raise FormatError(f"pointer array: {exc}") from exc


def pack_indirect_block(bsize: int, ptrs: list[int] | tuple[int, ...]) -> bytes:
    """An IN block holding `ptrs` (at most inptrs), zero padded."""
    if len(ptrs) > (bsize - IN_HEADER_SIZE) // 8:
        raise FormatError(f"indirect block: {len(ptrs)} pointers do not fit {bsize} bytes")
    header = MetaHeader.for_type(METATYPE_IN).pack()
    return pad_block(header + pack_pointers(ptrs), bsize, "indirect block")


def unpack_indirect_block(block: Buffer, bsize: int | None = None) -> list[int]:
    """All inptrs pointer slots of an IN block (type checked)."""
    size = len(block) if bsize is None else bsize
    expect_header(block, 0, METATYPE_IN, "indirect block")
    return unpack_pointers(block, IN_HEADER_SIZE, (size - IN_HEADER_SIZE) // 8)


def block_path(lblock: int, height: int, inptrs: int, diptrs: int) -> list[int]:
    """Pointer indexes from the dinode down to logical block `lblock` at `height`.

    The first index is into the dinode's pointer array, the rest into IN blocks; each
    is a base-`inptrs` digit of lblock, most significant first.
    """
    if height < 1:
        raise ValueError("a stuffed inode (height 0) has no pointer tree")
    path = []
    rest = lblock
    for _ in range(height - 1):
        rest, digit = divmod(rest, inptrs)
        path.append(digit)
    if rest >= diptrs:
        raise ValueError(f"logical block {lblock} is beyond a height-{height} tree")
    path.append(rest)
    path.reverse()
    return path
