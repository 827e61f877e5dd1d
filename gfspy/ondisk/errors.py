"""The one exception the on-disk codecs raise.

It subclasses ValueError because a bad structure is bad *data*, not an I/O failure:
callers (mount, fsck) decide whether that means withdraw, repair or refuse.
"""

from __future__ import annotations


class FormatError(ValueError):
    """A buffer does not hold the GFS2 structure the caller asked for.

    Raised for a missing magic, an unexpected metadata type, an impossible field
    (e.g. a dirent chain that does not tile its block) or a buffer too short to hold
    the structure. The message names the structure and what was wrong with it.
    """
