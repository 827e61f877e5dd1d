"""FUSE_HANDLE_KILLPRIV_V2 for pyfuse3, through gfspy's small C channel library.

Without the flag the kernel asks the daemon for "security.capability" before every
write(2) (FUSE superblocks never get SB_NOSEC), which caps small writes at one
round trip into Python each. With it, the kernel stops asking, and the filesystem
clears set-id bits itself when a WRITE, SETATTR or OPEN request says so.

pyfuse3 3.5 and libfuse 3.14 cannot ask for the flag, so _fuse_channel.c wraps
libfuse's fuse_session_mount: pyfuse3 must bind to our definition, which is why
this module loads the library (RTLD_GLOBAL) when gfspy.fuse is imported, before
anything imports pyfuse3. Whatever goes wrong (library missing, pyfuse3 imported
first, custom I/O refused), the flag is simply not claimed and the kernel keeps
doing the work as before: it is never claimed without being honoured.

A handler learns what its own request carried with request_kills_suidgid(), which
must be called before the handler's first await: pyfuse3 runs it synchronously
from the moment the request is read until then.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import stat
import sys

log = logging.getLogger(__name__)

__all__ = [
    "FUSE_OPEN",
    "FUSE_SETATTR",
    "FUSE_WRITE",
    "capability_probes",
    "enable",
    "mode_after_kill",
    "negotiated",
    "report",
    "request_kills_suidgid",
    "status",
]

# Opcodes from <linux/fuse.h>.
FUSE_SETATTR = 4
FUSE_OPEN = 14
FUSE_WRITE = 16

_LIBRARY_MODULE = "gfspy.fuse._fuse_channel"
_INSTALLED = 1
_MOUNTED_WITHOUT_CLAIM = 2


def _load() -> tuple[ctypes.CDLL | None, str]:
    """The channel library, or None and why not."""
    if "pyfuse3" in sys.modules:
        # Our fuse_session_mount could still win (lazy binding), but may not; the
        # install state after the mount says which.
        log.debug("pyfuse3 was imported before %s", __name__)
    try:
        spec = importlib.util.find_spec(_LIBRARY_MODULE)
    except ImportError:
        spec = None
    if spec is None or not spec.origin:
        return None, f"{_LIBRARY_MODULE} is not built (pip install -e . builds it)"
    try:
        lib = ctypes.CDLL(spec.origin, mode=os.RTLD_NOW | os.RTLD_GLOBAL)
    except OSError as e:
        return None, f"cannot load {spec.origin}: {e}"
    lib.gfspy_channel_enable.restype = None
    lib.gfspy_channel_enable.argtypes = []
    for name in (
        "gfspy_channel_install_state",
        "gfspy_channel_kernel_offered",
        "gfspy_channel_negotiated",
    ):
        getattr(lib, name).restype = ctypes.c_int
        getattr(lib, name).argtypes = []
    lib.gfspy_channel_last_request.restype = ctypes.c_uint64
    lib.gfspy_channel_last_request.argtypes = [
        ctypes.POINTER(ctypes.c_uint32),
        ctypes.POINTER(ctypes.c_int),
    ]
    lib.gfspy_channel_capability_probes.restype = ctypes.c_uint64
    lib.gfspy_channel_capability_probes.argtypes = []
    return lib, ""


_lib, _load_error = _load()
_enabled = False
#: Cached once true: the flag can only be negotiated once, at INIT.
_negotiated = False
_opcode = ctypes.c_uint32()
_kill = ctypes.c_int()
_mismatch_logged = False


def enable() -> bool:
    """Claim the flag at the kernel's INIT. Call before pyfuse3.init(); the caller
    promises to honour the kill bits. False if the library is unavailable."""
    global _enabled
    if _lib is None:
        log.warning("FUSE_HANDLE_KILLPRIV_V2 unavailable: %s", _load_error)
        return False
    _lib.gfspy_channel_enable()
    _enabled = True
    return True


def negotiated() -> bool:
    """True once the kernel accepted the flag: the fs must clear set-id bits itself."""
    global _negotiated
    if not _negotiated and _lib is not None:
        _negotiated = bool(_lib.gfspy_channel_negotiated())
    return _negotiated


def request_kills_suidgid(opcode: int) -> bool:
    """Whether the request being served (a WRITE, SETATTR or OPEN) asks the fs to
    clear set-id bits: never unless the flag was negotiated (the kernel then does it
    itself). Call it before the handler's first await."""
    global _mismatch_logged
    if _lib is None or not negotiated():
        return False
    _lib.gfspy_channel_last_request(ctypes.byref(_opcode), ctypes.byref(_kill))
    if _opcode.value != opcode:
        # The request read last is not the one being served: the assumption about
        # pyfuse3's loop broke. Clearing is what the kernel would do when unsure.
        if not _mismatch_logged:
            _mismatch_logged = True
            log.error(
                "kill-suid/sgid lookup: serving opcode %d but the last request read was "
                "opcode %d; clearing set-id bits to be safe",
                opcode,
                _opcode.value,
            )
        return True
    return bool(_kill.value)


def mode_after_kill(mode: int) -> int:
    """The mode once set-id bits are killed as the VFS does: set-user-ID always,
    set-group-ID only with group execute (without it, it marks mandatory locking)."""
    mode &= ~stat.S_ISUID
    if mode & stat.S_IXGRP:
        mode &= ~stat.S_ISGID
    return mode


def capability_probes() -> int | None:
    """GETXATTR "security.capability" requests read from the kernel so far, or None
    when the channel library does not see the requests (flag not claimed)."""
    if _lib is None or _lib.gfspy_channel_install_state() != _INSTALLED:
        return None
    return int(_lib.gfspy_channel_capability_probes())


def report(mountpoint: str) -> None:
    """Log, once INIT is done, whether the flag was negotiated, and if not why."""
    degraded = _enabled and not negotiated()
    log.log(logging.WARNING if degraded else logging.INFO, "%s: %s", mountpoint, status())


def status() -> str:
    """One line for the log, once INIT is done: negotiated or why not."""
    if negotiated():
        return "FUSE_HANDLE_KILLPRIV_V2 negotiated: the filesystem clears set-id bits"
    if not _enabled:
        return "FUSE_HANDLE_KILLPRIV_V2 not claimed (nokillpriv or library unavailable)"
    assert _lib is not None
    state = _lib.gfspy_channel_install_state()
    if state == 0:
        return (
            "FUSE_HANDLE_KILLPRIV_V2 not claimed: pyfuse3 did not bind to gfspy's "
            "fuse_session_mount (was pyfuse3 imported before gfspy.fuse?)"
        )
    if state < 0:
        return f"FUSE_HANDLE_KILLPRIV_V2 not claimed: custom I/O failed: {os.strerror(-state)}"
    if state == _MOUNTED_WITHOUT_CLAIM:
        return "FUSE_HANDLE_KILLPRIV_V2 not claimed: enabled after the mount"
    if not _lib.gfspy_channel_kernel_offered():
        return "FUSE_HANDLE_KILLPRIV_V2 not offered by the kernel"
    return "FUSE_HANDLE_KILLPRIV_V2 not negotiated: the INIT reply was not sent with it"
