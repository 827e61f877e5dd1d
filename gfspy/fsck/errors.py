"""The two ways a check can end early, mapped to fsck(8) exit codes by the CLI."""

from __future__ import annotations


class OperationalError(Exception):
    """The device cannot be checked at all (unreadable, not GFS2, truncated): exit 8."""


class CheckAborted(Exception):
    """A structure every later pass depends on is corrupt (e.g. no usable rindex).

    The problem has already been reported; checking stops and the exit code is 4.
    """
