"""Lock modes, flags, status codes and the argument rules of the VMS/Linux DLM.

Everything here is a constant or a pure function, so both the grant engine and the
lockspace agent validate calls the same way before anything is queued: a call that
fails validation never produces a completion callback.
"""

from __future__ import annotations

import enum
import errno


class Mode(enum.IntEnum):
    """Lock modes, weakest to strongest; the numeric order decides "highest mode"."""

    IV = -1  # no mode: a lock that has never been granted
    NL = 0
    CR = 1
    CW = 2
    PR = 3
    PW = 4
    EX = 5


#: Rows: granted mode, columns: requested mode (NL..EX). Symmetric.
_COMPAT = (
    (1, 1, 1, 1, 1, 1),  # NL
    (1, 1, 1, 1, 1, 0),  # CR
    (1, 1, 1, 0, 0, 0),  # CW
    (1, 1, 0, 1, 0, 0),  # PR
    (1, 1, 0, 0, 0, 0),  # PW
    (1, 0, 0, 0, 0, 0),  # EX
)

#: LVB transfer on a grant, rows: granted mode before (IV..EX), columns: requested mode.
#: 1 = read the resource LVB into the lock, 0 = write the lock's LVB to the resource,
#: -1 = leave it alone.
_LVB_OPS = (
    (1, 1, 1, 1, 1, 1),  # IV (new request)
    (1, 1, 1, 1, 1, 1),  # NL
    (-1, 1, 1, 1, 1, 1),  # CR
    (-1, -1, 1, 1, 1, 1),  # CW
    (-1, -1, -1, 1, 1, 1),  # PR
    (0, 0, 0, 0, 0, 1),  # PW
    (0, 0, 0, 0, 0, 0),  # EX
)

LVB_READ = 1
LVB_WRITE = 0
LVB_NONE = -1


def compatible(granted: int, requested: int) -> bool:
    """True when a lock granted in `granted` may coexist with one granted `requested`.

    IV (no granted mode) never conflicts: a lock that holds nothing blocks nobody.
    """
    if granted < 0 or requested < 0:
        return True
    return bool(_COMPAT[granted][requested])


def lvb_operation(granted: int, requested: int) -> int:
    """What a grant from `granted` to `requested` does to the LVB (LVB_READ/WRITE/NONE)."""
    return _LVB_OPS[granted + 1][requested]


def is_up_conversion(granted: int, requested: int) -> bool:
    """Genuine up-conversions, the only ones QUECVT accepts (CW<->PR counts both ways)."""
    if {granted, requested} == {Mode.CW, Mode.PR}:
        return True
    return requested > granted


class Flag:
    """Request flags (the Linux DLM_LKF_* bits, same values).

    Plain ints rather than an IntFlag: flag tests sit on the lock fast path, and enum
    arithmetic costs more than the whole grant decision."""

    NONE = 0
    NOQUEUE = 0x00000001
    CANCEL = 0x00000002
    CONVERT = 0x00000004
    VALBLK = 0x00000008
    QUECVT = 0x00000010
    IVVALBLK = 0x00000020
    CONVDEADLK = 0x00000040
    PERSISTENT = 0x00000080
    NODLCKWT = 0x00000100
    NODLCKBLK = 0x00000200
    EXPEDITE = 0x00000400
    NOQUEUEBAST = 0x00000800
    HEADQUE = 0x00001000
    NOORDER = 0x00002000
    ORPHAN = 0x00004000
    ALTPR = 0x00008000
    ALTCW = 0x00010000
    FORCEUNLOCK = 0x00020000
    TIMEOUT = 0x00040000
    #: gfspy's own bit: the request may be granted to the filesystem while grants are
    #: held back for journal recovery (GFS2's LM_FLAG_NOEXP). Only the lockspace uses it.
    NOEXP = 0x01000000


#: Flags accepted on a request or conversion.
REQUEST_FLAGS = (
    Flag.NOQUEUE
    | Flag.CONVERT
    | Flag.VALBLK
    | Flag.QUECVT
    | Flag.IVVALBLK
    | Flag.CONVDEADLK
    | Flag.NODLCKWT
    | Flag.EXPEDITE
    | Flag.NOQUEUEBAST
    | Flag.HEADQUE
    | Flag.NOORDER
    | Flag.ALTPR
    | Flag.ALTCW
    | Flag.NOEXP
)
#: Flags accepted on an unlock.
UNLOCK_FLAGS = Flag.CANCEL | Flag.VALBLK | Flag.IVVALBLK | Flag.FORCEUNLOCK


class SBFlag:
    """Status flags returned with a completion (Linux DLM_SBF_*); plain ints like Flag."""

    NONE = 0
    DEMOTED = 0x01
    VALNOTVALID = 0x02
    ALTMODE = 0x04


#: Positive "success" statuses of unlock and cancel (Linux DLM_EUNLOCK / DLM_ECANCEL).
EUNLOCK = 0x10002
ECANCEL = 0x10001
#: Status values a completion may carry besides 0.
EAGAIN = -errno.EAGAIN
EDEADLK = -errno.EDEADLK

LVB_LEN = 32
MAX_NAME_LEN = 64


class DLMError(OSError):
    """A call rejected synchronously (EINVAL, EBUSY, ENOENT...), or a failed operation.

    Synchronous rejections never produce a completion callback.
    """

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)


def status_name(status: int) -> str:
    """Readable name of a completion status, for logs and dumps."""
    if status == 0:
        return "granted"
    if status == EUNLOCK:
        return "EUNLOCK"
    if status == ECANCEL:
        return "ECANCEL"
    if status < 0:
        return errno.errorcode.get(-status, str(status))
    return str(status)


def _bad(message: str) -> DLMError:
    return DLMError(errno.EINVAL, message)


def validate_request(mode: int, flags: int, name: bytes, has_lvb: bool) -> None:
    """Argument rules of a new request; raises DLMError(EINVAL)."""
    if not Mode.NL <= mode <= Mode.EX:
        raise _bad(f"mode {mode} out of range")
    if flags & ~REQUEST_FLAGS:
        raise _bad(f"unsupported flags {flags:#x}")
    if flags & Flag.CONVERT:
        raise _bad("CONVERT on a new request")
    if len(name) > MAX_NAME_LEN or not name:
        raise _bad(f"resource name must be 1..{MAX_NAME_LEN} bytes")
    if flags & (Flag.QUECVT | Flag.CONVDEADLK):
        raise _bad("QUECVT/CONVDEADLK only with CONVERT")
    if flags & Flag.EXPEDITE and (mode != Mode.NL or flags & (Flag.NOQUEUE | Flag.QUECVT)):
        raise _bad("EXPEDITE only for a new NL request without NOQUEUE/QUECVT")
    if flags & Flag.VALBLK and not has_lvb:
        raise _bad("VALBLK needs an LVB buffer")


def validate_convert(granted: int, mode: int, flags: int, has_lvb: bool) -> None:
    """Argument rules of a conversion of a lock granted in `granted`."""
    if not Mode.NL <= mode <= Mode.EX:
        raise _bad(f"mode {mode} out of range")
    if flags & ~REQUEST_FLAGS:
        raise _bad(f"unsupported flags {flags:#x}")
    if flags & Flag.CONVDEADLK and flags & Flag.NOQUEUE:
        raise _bad("CONVDEADLK with NOQUEUE")
    if flags & Flag.EXPEDITE:
        raise _bad("EXPEDITE on a conversion")
    if flags & Flag.QUECVT and not is_up_conversion(granted, mode):
        raise _bad(f"QUECVT on a conversion {Mode(granted).name}->{Mode(mode).name}")
    if flags & Flag.VALBLK and not has_lvb:
        raise _bad("VALBLK needs an LVB buffer")


def validate_unlock(flags: int) -> None:
    """Argument rules of unlock/cancel/force-unlock."""
    if flags & ~UNLOCK_FLAGS:
        raise _bad(f"unsupported unlock flags {flags:#x}")
    if flags & Flag.CANCEL and flags & Flag.FORCEUNLOCK:
        raise _bad("CANCEL and FORCEUNLOCK together")


def check_lvb(lvb: bytes | None) -> bytes | None:
    """LVBs are exactly LVB_LEN bytes; a shorter buffer is zero-padded for convenience."""
    if lvb is None:
        return None
    if len(lvb) > LVB_LEN:
        raise _bad(f"LVB longer than {LVB_LEN} bytes")
    return bytes(lvb).ljust(LVB_LEN, b"\0")
