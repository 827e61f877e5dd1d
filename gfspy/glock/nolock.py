"""lock_nolock: the single-node lock module; every request is granted at once.

It still goes through the same glock state machine as the DLM module will, so the
filesystem's sync/invalidate paths run the same way on one node as in a cluster.
"""

from __future__ import annotations

import logging

from gfspy.glock.lockmodule import LockModule

log = logging.getLogger(__name__)


class NoLock(LockModule):
    """Grants any state immediately; never sends blocking callbacks."""

    name = "lock_nolock"

    def __init__(self) -> None:
        self.requests = 0

    async def lock(self, gl_type: int, number: int, current: int, wanted: int) -> int:
        self.requests += 1
        return wanted

    async def unlock(self, gl_type: int, number: int) -> None:
        self.requests += 1
