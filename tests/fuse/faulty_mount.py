"""mount.gfspy with bugs injected into the fs layer, for the handler-robustness test.

Fault injection is the one thing a real mount cannot give on demand: this wraps a
few FileSystem methods so that chosen names raise exceptions no handler expects,
then runs the real mount.gfspy main() unchanged.
"""

from __future__ import annotations

import sys

from gfspy.fs.api import FileSystem
from gfspy.fuse.mount import main

_lookup = FileSystem.lookup
_getxattr = FileSystem.getxattr
_read = FileSystem.read


async def lookup(self, parent, name):
    if name == b"boom":
        raise RuntimeError("injected bug in lookup")
    return await _lookup(self, parent, name)


async def getxattr(self, ino, name):
    if name == b"user.boom":
        raise ZeroDivisionError("injected bug in getxattr")
    return await _getxattr(self, ino, name)


async def read(self, ino, offset, size):
    if offset >= 1 << 30:
        raise MemoryError("injected allocation failure in read")
    return await _read(self, ino, offset, size)


FileSystem.lookup = lookup
FileSystem.getxattr = getxattr
FileSystem.read = read

if __name__ == "__main__":
    sys.exit(main())
