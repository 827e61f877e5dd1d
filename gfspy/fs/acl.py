"""POSIX ACL xattr values, as far as the filesystem must understand them.

Without FUSE's POSIX-ACL mode the kernel hands system.posix_acl_access through as
an opaque xattr, so keeping the mode bits in step is the filesystem's job: an access
ACL sets the owner, group (or mask) and other permission bits, and one that says no
more than the mode is not stored at all, exactly as Linux filesystems do.
"""

from __future__ import annotations

import errno
import struct

from gfspy.fs.types import FsError

ACL_VERSION = 2
ACL_USER_OBJ = 0x01
ACL_USER = 0x02
ACL_GROUP_OBJ = 0x04
ACL_GROUP = 0x08
ACL_MASK = 0x10
ACL_OTHER = 0x20

ACCESS_ACL = b"system.posix_acl_access"
DEFAULT_ACL = b"system.posix_acl_default"

_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")


def parse_acl(value: bytes) -> list[tuple[int, int, int]]:
    """(tag, perm, id) entries; FsError(EINVAL) for anything malformed."""
    if len(value) < _HEADER.size or (len(value) - _HEADER.size) % _ENTRY.size:
        raise FsError(errno.EINVAL, "malformed POSIX ACL")
    if _HEADER.unpack_from(value)[0] != ACL_VERSION:
        raise FsError(errno.EINVAL, "unsupported POSIX ACL version")
    entries = [
        _ENTRY.unpack_from(value, off) for off in range(_HEADER.size, len(value), _ENTRY.size)
    ]
    tags = [tag for tag, _perm, _id in entries]
    for tag, perm, _id in entries:
        if perm & ~7 or tag not in (
            ACL_USER_OBJ,
            ACL_USER,
            ACL_GROUP_OBJ,
            ACL_GROUP,
            ACL_MASK,
            ACL_OTHER,
        ):
            raise FsError(errno.EINVAL, "bad POSIX ACL entry")
    for needed in (ACL_USER_OBJ, ACL_GROUP_OBJ, ACL_OTHER):
        if tags.count(needed) != 1:
            raise FsError(errno.EINVAL, "POSIX ACL lacks a required entry")
    named = ACL_USER in tags or ACL_GROUP in tags
    if tags.count(ACL_MASK) > 1 or (named and ACL_MASK not in tags):
        raise FsError(errno.EINVAL, "POSIX ACL mask entry missing or repeated")
    return entries


def apply_access_acl(mode: int, value: bytes) -> tuple[int, bool]:
    """(new mode, whether the ACL must be stored) for an access ACL being set.

    The group bits of the mode mirror the mask entry when there is one."""
    perms: dict[int, int] = {}
    extended = False
    for tag, perm, _id in parse_acl(value):
        if tag in (ACL_USER, ACL_GROUP, ACL_MASK):
            extended = True
        if tag not in (ACL_USER, ACL_GROUP):
            perms[tag] = perm
    group = perms.get(ACL_MASK, perms[ACL_GROUP_OBJ])
    new_mode = (mode & ~0o777) | perms[ACL_USER_OBJ] << 6 | group << 3 | perms[ACL_OTHER]
    return new_mode, extended


def pack_acl(entries: list[tuple[int, int, int]]) -> bytes:
    return _HEADER.pack(ACL_VERSION) + b"".join(_ENTRY.pack(*e) for e in entries)


def inherit_acl(default_value: bytes, mode: int) -> tuple[int, bytes | None]:
    """A new inode in a directory with a default ACL: (its mode, its access ACL or
    None when the mode alone says it). The requested mode and the default ACL
    restrict each other, as POSIX.1e specifies for object creation."""
    entries = parse_acl(default_value)
    out = []
    extended = False
    group_index = mask_index = -1
    for tag, perm, ident in entries:
        if tag == ACL_USER_OBJ:
            perm &= (mode >> 6) & 7
            mode &= (perm << 6) | ~0o700
        elif tag == ACL_OTHER:
            perm &= mode & 7
            mode &= perm | ~0o7
        elif tag in (ACL_USER, ACL_GROUP):
            extended = True
        elif tag == ACL_GROUP_OBJ:
            group_index = len(out)
        elif tag == ACL_MASK:
            mask_index = len(out)
            extended = True
        out.append((tag, perm, ident))
    index = mask_index if mask_index >= 0 else group_index
    tag, perm, ident = out[index]
    perm &= (mode >> 3) & 7
    mode &= (perm << 3) | ~0o070
    out[index] = (tag, perm, ident)
    return mode, (pack_acl(out) if extended else None)
