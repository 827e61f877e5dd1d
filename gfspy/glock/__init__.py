"""Glocks: cached cluster locks on (type, number) with per-type sync/invalidate."""

from gfspy.glock.glock import (
    LM_ST_DEFERRED,
    LM_ST_EXCLUSIVE,
    LM_ST_SHARED,
    LM_ST_UNLOCKED,
    Glock,
    GlockOps,
    GlockTable,
    Holder,
)
from gfspy.glock.lockmodule import LockModule
from gfspy.glock.nolock import NoLock

__all__ = [
    "LM_ST_DEFERRED",
    "LM_ST_EXCLUSIVE",
    "LM_ST_SHARED",
    "LM_ST_UNLOCKED",
    "Glock",
    "GlockOps",
    "GlockTable",
    "Holder",
    "LockModule",
    "NoLock",
]
