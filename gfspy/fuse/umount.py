"""umount.gfspy: unmount a gfspy FUSE mount and return only once its daemon has finished
the clean unmount (log flushed, statfs folded, clean-unmount log header written).

umount(8) runs it as /sbin/umount.fuse.gfspy. The daemon is found through the record
it keeps (gfspy.fuse.mount_record); the outcome is the one it wrote before exiting.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import subprocess
import sys
import time
from pathlib import Path

from gfspy.fuse.mount_record import (
    FSTYPE,
    MountEntry,
    find_record,
    forget_dead_daemons_in_utab,
    process_start,
    read_mountinfo,
    read_record,
)

PROG = "umount.gfspy"
EXIT_OK = 0
EXIT_USAGE = 1
EXIT_FAILURE = 32
DEFAULT_TIMEOUT = 300.0
MNT_FORCE = 1
MNT_DETACH = 2
CLONE_NEWNS = 0x00020000
_POLL_INTERVAL = 0.05

EPILOG = """\
Without -l it returns only once the daemon has exited, and exit status 0 means the
daemon reported a clean unmount (log flushed, clean-unmount log header written): the
device can be checked (fsck.gfs2 -n), copied or mounted elsewhere at once. A plain
umount or fusermount3 -u returns as soon as the kernel has detached the mount.

  -l   detach now and return without waiting; the daemon finishes its clean
       unmount once the last open file on the mount is closed
  -f   (root only) abort the FUSE connection, so requests still pending in the
       kernel fail; the daemon still closes the filesystem cleanly, and is
       waited for
umount(8) may also pass -n and -r (meaningless for FUSE; ignored), -t TYPE
(ignored: the type is read from /proc/self/mountinfo) and -N NAMESPACE (unmount in
that mount namespace, e.g. /proc/PID/ns/mnt).

To let umount(8) use it, link it where umount(8) looks for helpers:
  ln -s "$(command -v umount.gfspy)" /sbin/umount.fuse.gfspy
Root's umount(8) runs the helper only for mounts listed in libmount's utab
(/run/mount/utab); mount.gfspy registers each of its mounts there (the option
x-gfspy.daemon=PID) and removes the entry when it exits.

exit status:
  0   unmounted and the daemon reported a clean unmount (with -l: detached)
  1   bad usage
  32  failure, said in one line: MOUNTPOINT is not mounted or not a gfspy mount
      (nothing is unmounted), the unmount failed (busy), the daemon died or
      reported an unclean unmount (replay the journal: mount again, or
      fsck.gfs2), no daemon record confirms the outcome, or the timeout passed
      with the daemon still running

examples:
  umount.gfspy /mnt/gfs2 && fsck.gfs2 -n /srv/gfs2.img
  umount /mnt/gfs2                      (with /sbin/umount.fuse.gfspy linked)
"""


class _Parser(argparse.ArgumentParser):
    """argparse that fails with one line and mount(8)'s usage code."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: {message}\n")


class UmountError(Exception):
    """The unmount failed or could not be confirmed clean; the message is for the user."""


def _timeout(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not a number of seconds") from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"{text}: must be more than 0 seconds")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        usage=f"{PROG} [-l] [-f] [-n] [-v] [-r] [--timeout SECONDS] MOUNTPOINT",
        description=(
            "Unmount the gfspy filesystem at MOUNTPOINT and wait until its mount.gfspy "
            "daemon has finished the clean unmount."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("target", metavar="MOUNTPOINT", help="the mount point (or its device)")
    parser.add_argument("-l", "--lazy", action="store_true", help="detach, do not wait")
    parser.add_argument("-f", "--force", action="store_true", help="abort the connection first")
    parser.add_argument("-v", "--verbose", action="store_true", help="say how it ended")
    parser.add_argument(
        "--timeout", type=_timeout, default=DEFAULT_TIMEOUT, metavar="SECONDS",
        help=f"how long to wait for the daemon (default {DEFAULT_TIMEOUT:.0f})",
    )  # fmt: skip
    # Passed by umount(8); meaningless for a FUSE mount.
    parser.add_argument("-n", "-r", dest="ignored", action="count", help=argparse.SUPPRESS)
    parser.add_argument("-t", dest="fstype", help=argparse.SUPPRESS)
    parser.add_argument("-N", dest="namespace", help=argparse.SUPPRESS)
    return parser


def _canonical(target: str) -> str:
    """The path as mountinfo shows it, resolving only the parent: resolving the mount
    point itself would stat it, which asks a daemon that may be dead or busy."""
    path = os.path.abspath(target)
    if path == "/":
        return path
    parent, name = os.path.split(path)
    return os.path.join(os.path.realpath(parent), name)


def find_mount(target: str, entries: list[MountEntry]) -> MountEntry:
    """The mount at target (the top one if stacked), else a gfspy mount of that device."""
    path = _canonical(target)
    for entry in reversed(entries):
        if entry.mountpoint == path:
            return entry
    full = os.path.realpath(target)  # a symlink to the mount point, or a device path
    for entry in reversed(entries):
        if entry.mountpoint == full or (entry.fstype == FSTYPE and entry.source in (target, full)):
            return entry
    raise UmountError(f"{target}: not mounted")


def _enter_namespace(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNS) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    finally:
        os.close(fd)


def _unmount(mountpoint: str, *, lazy: bool, force: bool) -> None:
    if os.geteuid() == 0:
        flags = (MNT_DETACH if lazy else 0) | (MNT_FORCE if force else 0)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.umount2(os.fsencode(mountpoint), flags) != 0:
            raise UmountError(f"{mountpoint}: {os.strerror(ctypes.get_errno())}")
        return
    # fusermount3 is how a user unmounts their FUSE mount; it has no force.
    cmd = ["fusermount3", "-u", *(["-z"] if lazy else []), mountpoint]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise UmountError(f"{mountpoint}: cannot run fusermount3: {e}") from None
    if result.returncode != 0:
        why = result.stderr.strip().splitlines()[-1:] or [f"exit {result.returncode}"]
        raise UmountError(f"{mountpoint}: {why[0]}")


def _wait_exit(pid: int, start: int | None, timeout: float) -> bool:
    """True once the process is gone (a zombie counts), False at the timeout."""
    deadline = time.monotonic() + timeout
    while start is not None and process_start(pid) == start:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(_POLL_INTERVAL, remaining))
    return True


def _outcome(path: Path, pid: int) -> str:
    """After the daemon exited: an empty string if it reported a clean unmount, else why not."""
    record = read_record(path)
    if record is None or record.get("pid") != pid:
        return f"the daemon (pid {pid}) left no outcome"
    if record.get("state") != "finished":
        return f"the daemon (pid {pid}) died before finishing its clean unmount"
    if not record.get("clean"):
        return (f"the daemon (pid {pid}) reported an unclean unmount "
                f"(exit {record.get('exit_code')}; see its log)")  # fmt: skip
    return ""


def _forget(path: Path) -> None:
    """Nobody else reads a record once its outcome is known; remove ours only."""
    with contextlib.suppress(OSError):
        if path.stat().st_uid == os.geteuid():
            path.unlink()


def _still_mounted_elsewhere(dev: str) -> list[str]:
    return [e.mountpoint for e in read_mountinfo() if e.dev == dev]


def umount(target: str, *, lazy: bool, force: bool, timeout: float) -> str:
    """Unmount and wait; returns a report for -v, raises UmountError on any failure."""
    entry = find_mount(target, read_mountinfo())
    if entry.fstype != FSTYPE:
        raise UmountError(f"{target}: not a gfspy mount ({entry.fstype})")
    mountpoint = entry.mountpoint
    uids = [os.geteuid()]
    owner = entry.user_id()
    if os.geteuid() == 0 and owner not in (None, 0):
        uids.append(owner)  # root unmounting a user's mount reads that user's records
    found = find_record(entry, uids)
    started = time.monotonic()
    _unmount(mountpoint, lazy=lazy, force=force)
    if lazy:
        return f"{mountpoint}: detached; the daemon finishes once the last file is closed"
    if found is None:
        forget_dead_daemons_in_utab()
        raise UmountError(f"{mountpoint}: unmounted, but no mount.gfspy daemon record "
                          "confirms a clean unmount")  # fmt: skip
    path, record = found
    pid: int = record["pid"]
    start = record.get("start_time")
    others = _still_mounted_elsewhere(entry.dev)
    if others:
        return f"{mountpoint}: unmounted; the filesystem stays mounted at {', '.join(others)}"
    if not _wait_exit(pid, start, timeout):
        raise UmountError(f"{mountpoint}: unmounted, but the daemon (pid {pid}) still runs "
                          f"after {timeout:g} s: a long flush (see --timeout), or the "
                          "filesystem is mounted in another mount namespace")  # fmt: skip
    problem = _outcome(path, pid)
    _forget(path)
    if problem:
        forget_dead_daemons_in_utab()
        raise UmountError(f"{mountpoint}: unmounted, but {problem}: the journal will be "
                          "replayed by the next mount")  # fmt: skip
    elapsed = time.monotonic() - started
    return f"{mountpoint}: unmounted cleanly (daemon pid {pid} finished in {elapsed:.1f} s)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.namespace:
            try:
                _enter_namespace(args.namespace)
            except OSError as e:
                raise UmountError(f"{args.namespace}: cannot enter the mount namespace: "
                                  f"{e.strerror or e}") from None  # fmt: skip
        report = umount(args.target, lazy=args.lazy, force=args.force, timeout=args.timeout)
    except UmountError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as e:
        print(f"{PROG}: {args.target}: {e.strerror or e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{PROG}: {args.target}: interrupted", file=sys.stderr)
        return EXIT_FAILURE
    if args.verbose:
        print(f"{PROG}: {report}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
