"""mount.gfspy's -o option list: parse it into MountOptions, or say what is wrong.

mount(8) hands a helper one comma-separated list mixing generic VFS flags
(nosuid, noatime, ...), flags meant only for mount itself (defaults, noauto,
_netdev, user, ...) and filesystem options. We keep the ones FUSE understands,
drop mount's own, and refuse anything else so a typo never goes unnoticed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["MountOptions", "OptionError", "parse_options"]

#: Flags mount(8) and fstab use for their own purposes; meaningless to the helper.
_MOUNT_ONLY = frozenset(
    {"defaults", "auto", "noauto", "_netdev", "nofail", "user", "nouser", "users", "owner",
     "group", "comment", "x-systemd", "loop"}
)  # fmt: skip
#: Generic VFS flags libfuse's mount code applies itself.
_VFS_FLAGS = frozenset(
    {"nosuid", "suid", "nodev", "dev", "noexec", "exec", "async", "sync", "dirsync",
     "atime", "noatime", "nodiratime", "diratime", "relatime", "norelatime", "strictatime",
     "lazytime", "nolazytime"}
)  # fmt: skip
_LOCKPROTOS = ("lock_nolock", "lock_dlm")
_JID_RE = re.compile(r"^jid=(\d+)$")


class OptionError(ValueError):
    """An option mount.gfspy cannot accept; the message is for the user."""


@dataclass
class MountOptions:
    readonly: bool = False
    lockproto: str | None = None
    debug: bool = False
    allow_other: bool = False
    commit_interval: float = 60.0
    jid: int = 0
    #: Claim FUSE_HANDLE_KILLPRIV_V2 (gfspy clears set-id bits; small writes skip a
    #: security.capability round trip each); nokillpriv leaves it to the kernel.
    killpriv: bool = True
    #: Generic flags to hand to libfuse's mount (nosuid, noatime, ...).
    vfs_flags: list[str] = field(default_factory=list)


def _parse_commit(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise OptionError(f"commit={value!r}: not a number of seconds") from None
    if not 0 < seconds <= 86400:
        raise OptionError(f"commit={value}: must be more than 0 and at most 86400 seconds")
    return seconds


def _parse_hostdata(value: str, opts: MountOptions) -> None:
    # GFS2's hostdata is colon-separated key=value pairs; only jid= means anything
    # without a cluster.
    for item in filter(None, value.split(":")):
        match = _JID_RE.match(item)
        if match is None:
            raise OptionError(f"hostdata item {item!r} not supported (only jid=N)")
        opts.jid = int(match.group(1))


def parse_options(option_lists: list[str]) -> MountOptions:
    """Parse every -o argument given (later options win, as with mount(8))."""
    opts = MountOptions()
    for option_list in option_lists:
        for item in option_list.split(","):
            item = item.strip()
            if not item:
                continue
            key, has_value, value = item.partition("=")
            if key in _MOUNT_ONLY or key.startswith(("x-", "comment")):
                continue
            if not has_value and key in _VFS_FLAGS:
                opts.vfs_flags.append(key)
            elif item == "ro":
                opts.readonly = True
            elif item == "rw":
                opts.readonly = False
            elif item == "debug":
                opts.debug = True
            elif item == "allow_other":
                opts.allow_other = True
            elif item in ("killpriv", "nokillpriv"):
                opts.killpriv = item == "killpriv"
            elif key == "lockproto" and has_value:
                if value not in _LOCKPROTOS:
                    raise OptionError(
                        f"lockproto={value}: unknown lock protocol "
                        f"(expected {' or '.join(_LOCKPROTOS)})"
                    )
                opts.lockproto = value
            elif key == "commit" and has_value:
                opts.commit_interval = _parse_commit(value)
            elif key == "errors" and has_value:
                if value != "withdraw":
                    raise OptionError(f"errors={value}: only errors=withdraw is supported")
            elif key == "hostdata" and has_value:
                _parse_hostdata(value, opts)
            elif key == "jid" and has_value and value.isdigit():
                opts.jid = int(value)
            else:
                raise OptionError(f"unknown mount option {item!r}")
    return opts
