"""The record a mount.gfspy daemon leaves for umount.gfspy: who serves which mount,
then how it ended.

For a plain `fuse` mount the kernel detaches the mount at once and sends the daemon
nothing, so umount(8) returns while the daemon is still flushing. umount.gfspy closes
that gap: it finds the daemon through this record, unmounts, waits for the daemon to
exit and reads the outcome the daemon wrote last.

A record is a small JSON file, `<major>:<minor>-<pid>.json` (the mount's st_dev and the
daemon's pid) in /run/gfspy for root, or in $XDG_RUNTIME_DIR/gfspy (or
/run/user/UID/gfspy) for other users. The pid in the name keeps a new mount that
reuses a freed minor from overwriting the outcome of the one just unmounted. A record
is trusted only while its pid runs with the start time it records; the mount id tells
a dead daemon's record for this very mount from an older one.

As root, util-linux's umount(8) learns a mount's type from statfs(2), which only says
"fuse", and so never looks for /sbin/umount.fuse.gfspy, unless libmount's utab
(/run/mount/utab) holds an entry for the mount point: then it reads mountinfo, sees
"fuse.gfspy" and runs the helper. The daemon therefore adds such an entry, with the
option x-gfspy.daemon=PID, and drops it when it ends; a daemon that was killed leaves
its entry, which the next daemon drops. The utab is edited the way libmount does it:
under an exclusive flock(2) of utab.lock, by writing a new file and renaming it over.
Other users' umount(8) always reads mountinfo and needs no entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FSTYPE = "fuse.gfspy"
#: The userspace mount option (=daemon pid) that puts a gfspy mount in libmount's utab.
UTAB_OPTION = "x-gfspy.daemon"
#: A finished record nobody read is removed by the next daemon after this long.
STALE_AFTER = 60.0
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    dev: str  # "major:minor", the st_dev of every inode in the mount
    mountpoint: str
    fstype: str
    source: str
    super_options: str

    def user_id(self) -> int | None:
        """The uid FUSE records as the mount's owner (user_id=N)."""
        for option in self.super_options.split(","):
            key, _, value = option.partition("=")
            if key == "user_id" and value.isdigit():
                return int(value)
        return None


def _unescape(field: str) -> str:
    """The kernel writes space, tab, newline and backslash in mount tables as \\ooo."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def read_mountinfo(path: str = "/proc/self/mountinfo") -> list[MountEntry]:
    entries = []
    with open(path, "rb") as f:
        for raw in f:
            fields = os.fsdecode(raw.rstrip(b"\n")).split(" ")
            try:
                sep = fields.index("-", 6)  # optional fields end with a lone "-"
                entries.append(
                    MountEntry(
                        mount_id=int(fields[0]),
                        dev=fields[2],
                        mountpoint=_unescape(fields[4]),
                        fstype=_unescape(fields[sep + 1]),
                        source=_unescape(fields[sep + 2]),
                        super_options=fields[sep + 3] if len(fields) > sep + 3 else "",
                    )
                )
            except (ValueError, IndexError):
                continue
    return entries


def process_start(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), or None once it has exited
    (a zombie has exited too). Start time and pid together name one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])  # field 22 of proc_pid_stat(5)


def state_dirs(uid: int) -> list[Path]:
    """Where daemons of this uid keep records, the preferred place first."""
    if uid == 0:
        return [Path("/run/gfspy")]
    dirs = []
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and uid == os.geteuid():
        dirs.append(Path(runtime) / "gfspy")
    default = Path(f"/run/user/{uid}/gfspy")
    if default not in dirs:
        dirs.append(default)
    return dirs


def read_record(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def record_is_live(record: dict[str, Any]) -> bool:
    """True while the daemon that wrote the record is running."""
    pid, start = record.get("pid"), record.get("start_time")
    return isinstance(pid, int) and start is not None and process_start(pid) == start


def find_record(entry: MountEntry, uids: list[int]) -> tuple[Path, dict[str, Any]] | None:
    """The record of the daemon serving entry's filesystem: a running daemon's record
    for the same st_dev (unique among live mounts), else a dead daemon's record for
    this very mount (same mount id), the newest first."""
    dead = []
    for uid in uids:
        for directory in state_dirs(uid):
            for path in directory.glob(f"{entry.dev}-*.json"):
                record = read_record(path)
                if record is None or record.get("dev") != entry.dev:
                    continue
                if record_is_live(record):
                    return path, record
                if record.get("mount_id") == entry.mount_id:
                    with contextlib.suppress(OSError):
                        dead.append((path.stat().st_mtime, path, record))
    if not dead:
        return None
    _, path, record = max(dead, key=lambda item: item[0])
    return path, record


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    """A reader never sees half a record: write beside it, then rename over it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(Path(tmp))
        raise


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _remove_stale(directory: Path) -> None:
    """Records of daemons gone for a while (killed, or finished with nobody waiting)."""
    now = time.time()
    for path in directory.glob("*.json"):
        record = read_record(path)
        try:
            old = now - path.stat().st_mtime > STALE_AFTER
        except OSError:
            continue
        if old and (record is None or not record_is_live(record)):
            _unlink_quietly(path)


def _utab_path() -> Path:
    return Path(os.environ.get("LIBMOUNT_UTAB", "/run/mount/utab"))


def _mangle(text: str) -> str:
    """Escape as libmount does in utab: space, tab, newline and backslash as \\ooo."""
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in text)


def _utab_fields(line: bytes) -> dict[str, str]:
    fields = {}
    for item in os.fsdecode(line).split(" "):
        key, _, value = item.partition("=")
        fields[key] = _unescape(value)
    return fields


def _daemon_pid(fields: dict[str, str]) -> int | None:
    """The daemon a gfspy utab entry names; None for everybody else's entries."""
    for option in fields.get("OPTS", "").split(","):
        key, _, value = option.partition("=")
        if key == UTAB_OPTION and value.isdigit():
            return int(value)
    return None


def utab_has_entry(mountpoint: str) -> bool:
    """Whether libmount's utab lists mountpoint."""
    try:
        lines = _utab_path().read_bytes().splitlines()
    except OSError:
        return False
    return any(_utab_fields(line).get("TARGET") == mountpoint for line in lines)


@contextlib.contextmanager
def _locked_utab() -> Iterator[Path]:
    """libmount's lock: an exclusive flock(2) of utab.lock beside the utab."""
    path = _utab_path()
    path.parent.mkdir(mode=0o755, exist_ok=True)
    fd = os.open(f"{path}.lock", os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    finally:
        os.close(fd)


def edit_utab(drop: Callable[[int], bool], add: str | None = None) -> None:
    """Drop the gfspy entries whose daemon pid drop() picks, append add; other entries
    are kept byte for byte. Root only (the utab is root's)."""
    with _locked_utab() as path:
        try:
            lines = path.read_bytes().splitlines()
        except FileNotFoundError:
            lines = []
        kept = []
        for line in lines:
            pid = _daemon_pid(_utab_fields(line))
            if pid is None or not drop(pid):
                kept.append(line)
        if add is not None:
            kept.append(os.fsencode(add))
        if kept == lines:
            return
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(b"".join(line + b"\n" for line in kept))
                os.fchmod(f.fileno(), 0o644)
            os.replace(tmp, path)
        except BaseException:
            _unlink_quietly(Path(tmp))
            raise


def forget_dead_daemons_in_utab() -> None:
    """Drop the utab entries of gfspy daemons no longer running (killed ones)."""
    if os.geteuid() != 0 or not _utab_path().exists():
        return
    try:
        edit_utab(lambda pid: process_start(pid) is None)
    except OSError as e:
        log.debug("cannot clean the utab: %s", e)


class DaemonRecord:
    """The daemon's side: write the record once mounted, register with umount(8) once
    ready, write the outcome at the end. Every step is best-effort: a missing record
    only costs umount.gfspy its confirmation, never the mount."""

    def __init__(self, device: str, mountpoint: str) -> None:
        self.device = device
        # Resolved now: once the mount covers it, resolving would ask the daemon.
        self.mountpoint = os.path.realpath(mountpoint)
        self.path: Path | None = None
        self.data: dict[str, Any] = {}
        self.in_utab = False

    def write_serving(self) -> None:
        """Right after the FUSE mount is made (before INIT: reads only mountinfo)."""
        try:
            self._write_serving()
        except Exception:  # noqa: BLE001 - the record must never cost the mount
            log.warning("%s: cannot write the daemon record", self.mountpoint, exc_info=True)

    def _write_serving(self) -> None:
        try:
            entry = next(
                e
                for e in reversed(read_mountinfo())
                if e.mountpoint == self.mountpoint and e.fstype == FSTYPE
            )
        except (OSError, StopIteration):
            log.warning("%s: not found in mountinfo; umount.gfspy cannot find this daemon",
                        self.mountpoint)  # fmt: skip
            return
        pid = os.getpid()
        self.data = {
            "version": 1,
            "pid": pid,
            "start_time": process_start(pid),
            "mount_id": entry.mount_id,
            "dev": entry.dev,
            "mountpoint": self.mountpoint,
            "device": self.device,
            "state": "serving",
        }
        for directory in state_dirs(os.geteuid()):
            try:
                directory.mkdir(mode=0o755, exist_ok=True)
                _remove_stale(directory)
                path = directory / f"{entry.dev}-{pid}.json"
                _write_atomic(path, self.data)
            except OSError as e:
                log.debug("%s: cannot keep a record there: %s", directory, e)
                continue
            self.path = path
            log.debug("%s: daemon record %s", self.mountpoint, path)
            return
        log.warning("%s: no directory for the daemon record; umount.gfspy cannot "
                    "confirm this mount's clean unmount", self.mountpoint)  # fmt: skip

    def register_with_umount8(self) -> None:
        """Once INIT is done. Root only, see the module docstring: without a utab entry
        root's umount(8) never runs the helper."""
        if os.geteuid() != 0 or self.path is None:
            return
        pid = self.data["pid"]
        entry = " ".join(
            (f"ID={self.data['mount_id']}", f"SRC={_mangle(self.device)}",
             f"TARGET={_mangle(self.mountpoint)}", "ROOT=/", f"OPTS={UTAB_OPTION}={pid}")
        )  # fmt: skip
        try:
            # Entries of daemons that were killed go too (their pid no longer runs).
            edit_utab(lambda other: other == pid or process_start(other) is None, add=entry)
        except Exception:  # noqa: BLE001 - the entry must never cost the mount
            log.warning("%s: cannot register with umount(8) in %s", self.mountpoint,
                        _utab_path(), exc_info=True)  # fmt: skip
            return
        self.in_utab = True

    def write_outcome(self, exit_code: int) -> None:
        """The last thing the daemon does: the mount is gone, the device closed."""
        if self.path is not None:
            self.data.update(
                state="finished",
                exit_code=exit_code,
                clean=exit_code == 0,
                finished_at=time.time(),
            )
            try:
                _write_atomic(self.path, self.data)
            except Exception:  # noqa: BLE001 - the exit code still goes out
                log.warning("%s: cannot record the outcome in %s", self.mountpoint,
                            self.path, exc_info=True)  # fmt: skip
        if self.in_utab:
            pid = self.data["pid"]
            try:
                edit_utab(lambda other: other == pid)
            except Exception:  # noqa: BLE001 - a stale entry is dropped by the next mount
                log.warning("%s: cannot drop its utab entry", self.mountpoint, exc_info=True)
