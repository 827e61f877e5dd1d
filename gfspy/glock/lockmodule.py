"""The interface between glocks and whatever grants cluster locks (nolock or the DLM).

Glocks call `lock` to move a lock name to a new state; the module calls back
`GlockTable.blocking_callback` when another node wants a conflicting state. Keeping this
narrow lets the DLM agent plug in later without touching the filesystem code.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

#: Called by a lock module when another node needs (type, number) in a state that
#: conflicts with ours; the argument is the state it wants.
BlockingCallback = Callable[[int, int, int], None]


class LockModule(abc.ABC):
    """Grants glock states on lock names (type, number)."""

    name: str = "abstract"

    def set_blocking_callback(self, callback: BlockingCallback) -> None:  # noqa: B027
        """Remember whom to tell when another node needs a lock we hold."""

    @abc.abstractmethod
    async def lock(self, gl_type: int, number: int, current: int, wanted: int) -> int:
        """Move the lock from `current` to `wanted`; return the state granted."""

    @abc.abstractmethod
    async def unlock(self, gl_type: int, number: int) -> None:
        """Drop the lock entirely (state UN)."""

    async def aclose(self) -> None:  # noqa: B027
        """Release everything (unmount)."""
