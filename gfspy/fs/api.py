"""The filesystem API the FUSE adapter codes against (stable names, one import).

Contract, in short:

* `fs = await FileSystem.open(device, jid=0, readonly=False, lockproto=None,
  commit_interval=60.0)` mounts (replaying the journal, freeing crash orphans);
  `await fs.close()` is the clean unmount. The caller owns `device` and closes it.
* Inode numbers are dinode block addresses; `fs.root_ino` is the root.
* Every method raises `FsError` (`.errno` is what to return to the kernel);
  `FsWithdrawn` (errno EIO) means the mount found its metadata inconsistent and
  stopped all I/O. Nothing else escapes except genuine bugs.
* `await fs.open(ino)` / `await fs.release(ino)` count opens: an inode unlinked while
  open is freed at its last release. `await fs.forget(ino)` drops it from memory.
* `readdir(ino, cookie)` returns a batch of (name, attr, next_cookie) including "."
  and ".."; an empty list means the end. Pass the last next_cookie to continue.
* `SetAttr` fields left None are unchanged; `NOW` asks for the current time.
* `fs.invalidate_callback = f` makes the glock layer call `f(ino)` when an inode's
  cached state must go (a plain function; it must not block: schedule the pyfuse3
  invalidation from it, e.g. with trio.lowlevel.spawn_system_task or a memory channel).
* `await fs.run_periodic_flush()` flushes the log every commit_interval seconds, and
  `await fs.serve_glock_demotes()` serves other nodes' lock requests; run both in
  the mount's nursery (they return when the fs closes or withdraws).
"""

from gfspy.fs.filesystem import FileSystem
from gfspy.fs.types import (
    NOW,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    XATTR_CREATE,
    XATTR_REPLACE,
    Attr,
    FsError,
    FsWithdrawn,
    SetAttr,
    StatFs,
)

__all__ = [
    "NOW",
    "RENAME_EXCHANGE",
    "RENAME_NOREPLACE",
    "XATTR_CREATE",
    "XATTR_REPLACE",
    "Attr",
    "FileSystem",
    "FsError",
    "FsWithdrawn",
    "SetAttr",
    "StatFs",
]
