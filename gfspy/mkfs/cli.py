"""`gfspy-mkfs`: make a GFS2 filesystem, as mkfs.gfs2 does, on a file, device or NBD URI.

Everything is checked and the whole metadata tree is built in memory before the first
byte is written, so a refusal never leaves the device changed.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
import uuid as uuid_mod
from typing import NoReturn, TextIO

import trio

from gfspy.blockdev.device import DeviceError, open_device

from .alloc import OutOfSpace
from .builder import BuiltFilesystem, MkfsOptions, build_filesystem
from .dirs import DirectoryTooLarge
from .geometry import (
    DEFAULT_BSIZE,
    DEFAULT_QCSIZE_MB,
    DEFAULT_RGSIZE_MB,
    MAX_BSIZE,
    MAX_JOURNAL_MB,
    MAX_QCSIZE_MB,
    MAX_RGSIZE_MB,
    MIN_JOURNAL_MB,
    MIN_RGSIZE_MB,
    GeometryError,
    compute_layout,
)
from .signatures import PROBE_BYTES, detect
from .writer import write_filesystem

log = logging.getLogger(__name__)

PROG = "gfspy-mkfs"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

#: Devices at least this big get progress lines even when stderr is not a terminal.
LARGE_DEVICE = 64 << 30

_EPILOG = f"""\
DEVICE is an image file, a block device, or an nbd:// URI. BLOCKS limits the
filesystem to that many blocks at the start of the device (default: all of it).

The layout is the one mkfs.gfs2 3.5.0 makes with the same options: one resource group
per journal right after the superblock, then resource groups of about -r MiB. Without
-J the journal size follows the device size as in mkfs.gfs2 (8 MiB up to 1 GiB).
Before writing, the device is probed for an existing filesystem (gfs2, ext2/3/4, xfs,
btrfs, swap, LVM, LUKS, partition tables); one is never overwritten without -O.

exit status:
  {EXIT_OK}  the filesystem was made
  {EXIT_FAILED}  refused or failed: existing filesystem without -O, device too small,
     device cannot be opened or written; nothing was written when refused
  {EXIT_USAGE}  bad usage: unknown option, malformed number, block size, lock protocol
     or lock table, bad UUID
"""


class UsageError(Exception):
    """Bad command-line input; reported in one line with exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Make a GFS2 filesystem (format 1802) on DEVICE, byte-compatible with "
        "mkfs.gfs2, for use by gfspy and the Linux gfs2 module.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-O",
        dest="overwrite",
        action="store_true",
        help="overwrite an existing filesystem without asking",
    )
    parser.add_argument(
        "-p",
        dest="lockproto",
        default="lock_dlm",
        metavar="LOCKPROTO",
        help="locking protocol: lock_dlm (default; needs -t) or lock_nolock",
    )
    parser.add_argument(
        "-t",
        dest="locktable",
        default=None,
        metavar="CLUSTER:FSNAME",
        help="lock table: cluster name (1-32 chars) ':' filesystem name (1-30 "
        "chars), letters, digits, '-' and '_'",
    )
    parser.add_argument(
        "-j",
        dest="journals",
        default="1",
        metavar="JOURNALS",
        help="number of journals, one per node that mounts (default 1)",
    )
    parser.add_argument(
        "-J",
        dest="journal_mb",
        default=None,
        metavar="MB",
        help=f"journal size in MiB, {MIN_JOURNAL_MB}-{MAX_JOURNAL_MB} "
        "(default: chosen from the device size)",
    )
    parser.add_argument(
        "-r",
        dest="rgsize_mb",
        default=str(DEFAULT_RGSIZE_MB),
        metavar="MB",
        help=f"resource group size in MiB, {MIN_RGSIZE_MB}-{MAX_RGSIZE_MB} "
        f"(default {DEFAULT_RGSIZE_MB})",
    )
    parser.add_argument(
        "-b",
        dest="bsize",
        default=str(DEFAULT_BSIZE),
        metavar="BYTES",
        help=f"block size, a power of two 512-{MAX_BSIZE} (default {DEFAULT_BSIZE})",
    )
    parser.add_argument(
        "-U", dest="uuid", default=None, metavar="UUID", help="filesystem UUID (default: random)"
    )
    parser.add_argument(
        "-c",
        dest="qc_mb",
        default=str(DEFAULT_QCSIZE_MB),
        metavar="MB",
        help=f"size of each quota_change file in MiB, 1-{MAX_QCSIZE_MB} "
        f"(default {DEFAULT_QCSIZE_MB})",
    )
    parser.add_argument(
        "-q", dest="quiet", action="store_true", help="print nothing (no summary, no progress)"
    )
    parser.add_argument("device", metavar="DEVICE", help="image file, block device or NBD URI")
    parser.add_argument(
        "blocks",
        metavar="BLOCKS",
        nargs="?",
        default=None,
        help="filesystem size in blocks (default: the whole device)",
    )
    return parser


def _number(text: str, what: str, low: int, high: int | None = None) -> int:
    if not re.fullmatch(r"\d+", text.strip()):
        raise UsageError(f"{what} must be a whole number, not {text!r}")
    value = int(text)
    if value < low or (high is not None and value > high):
        bounds = f"{low}-{high}" if high is not None else f"at least {low}"
        raise UsageError(f"{what} must be {bounds}, not {value}")
    return value


_TABLE_CHARS = re.compile(r"[A-Za-z0-9_:-]*")


def check_lock_args(lockproto: str, locktable: str | None) -> str:
    """The lock table to store; UsageError with mkfs.gfs2's rules when it is wrong."""
    if lockproto not in ("lock_dlm", "lock_nolock"):
        raise UsageError(f"invalid lock protocol {lockproto!r}: use lock_dlm or lock_nolock")
    if locktable is None:
        if lockproto == "lock_dlm":
            raise UsageError("lock_dlm needs a lock table: -t CLUSTER:FSNAME")
        return ""
    if locktable == "":
        raise UsageError("invalid lock table: it is empty")
    if not _TABLE_CHARS.fullmatch(locktable):
        bad = next(c for c in locktable if not _TABLE_CHARS.fullmatch(c))
        raise UsageError(f"invalid lock table {locktable!r}: character {bad!r} is not allowed")
    if locktable.count(":") != 1:
        what = "missing colon" if ":" not in locktable else "more than one colon"
        raise UsageError(f"invalid lock table {locktable!r}: {what} (want CLUSTER:FSNAME)")
    cluster, fsname = locktable.split(":")
    if not 1 <= len(cluster) <= 32:
        raise UsageError(f"invalid lock table {locktable!r}: cluster name must be 1-32 characters")
    if not 1 <= len(fsname) <= 30:
        raise UsageError(
            f"invalid lock table {locktable!r}: filesystem name must be 1-30 characters"
        )
    return locktable


class _Progress:
    """`Writing resource groups: 1234/4096` on stderr: rewritten in place on a terminal,
    a line per quarter otherwise (logs of big runs stay short)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.last_step = -1
        self.last_time = 0.0

    def __call__(self, what: str, done: int, total: int) -> None:
        if self.tty:
            now = time.monotonic()
            if done == total or now - self.last_time >= 0.1:
                self.last_time = now
                end = "\n" if done == total else ""
                self.stream.write(f"\r{what}: {done}/{total}{end}")
                self.stream.flush()
            return
        step = done * 4 // total
        if step != self.last_step or done == total:
            if step != self.last_step:
                self.stream.write(f"{what}: {done}/{total}\n")
                self.stream.flush()
            self.last_step = step if done < total else -1


def _summary(device: str, device_bytes: int, fs: BuiltFilesystem) -> str:
    layout, sb = fs.layout, fs.superblock
    gib = 1 << 30
    rows = [
        ("Device:", device),
        ("Block size:", str(layout.bsize)),
        ("Device size:", f"{device_bytes / gib:.2f} GB ({device_bytes // layout.bsize} blocks)"),
        (
            "Filesystem size:",
            f"{layout.fs_size * layout.bsize / gib:.2f} GB ({layout.fs_size} blocks)",
        ),
        ("Journals:", str(layout.journals)),
        ("Journal size:", f"{layout.journal_mb}MB"),
        ("Resource groups:", str(len(layout.rgrps))),
        ("Locking protocol:", f'"{sb.lockproto}"'),
        ("Lock table:", f'"{sb.locktable}"'),
        ("UUID:", str(sb.uuid)),
    ]
    return "".join(f"{label:<27}{value}\n" for label, value in rows)


class Refused(Exception):
    """mkfs will not proceed; the message is the one line to print (exit 1)."""


async def _run(args: argparse.Namespace, opts: MkfsOptions, numbers: dict[str, int | None]) -> int:
    try:
        dev = await open_device(args.device)
    except DeviceError as e:
        raise Refused(f"cannot open {e.strerror or args.device}") from None
    async with dev:
        bsize = numbers["bsize"]
        assert bsize is not None
        if bsize < dev.block_size:
            raise Refused(
                f"block size {bsize} is smaller than the device's sector size {dev.block_size}"
            )
        probe_len = min(PROBE_BYTES, dev.size - dev.size % dev.block_size)
        head = await dev.read(0, probe_len) if probe_len > 0 else b""
        found = detect(head)
        if found and not args.overwrite:
            raise Refused(
                f"{args.device} appears to contain an existing {found} filesystem; use -O to overwrite it"
            )
        try:
            layout = compute_layout(
                device_bytes=dev.size,
                bsize=bsize,
                journals=numbers["journals"] or 1,
                journal_mb=numbers["journal_mb"],
                rgsize_mb=numbers["rgsize_mb"] or DEFAULT_RGSIZE_MB,
                fs_blocks=numbers["blocks"],
            )
            fs = build_filesystem(layout, opts)
        except GeometryError as e:
            raise Refused(f"{args.device}: {e}") from None
        except OutOfSpace:
            raise Refused(f"{args.device}: device too small for the system files") from None
        except DirectoryTooLarge as e:
            raise Refused(f"{args.device}: unsupported layout: {e}") from None
        show_progress = not args.quiet and (sys.stderr.isatty() or dev.size >= LARGE_DEVICE)
        progress = _Progress(sys.stderr) if show_progress else None
        try:
            await write_filesystem(dev, fs, progress)
        except DeviceError as e:
            raise Refused(f"writing {args.device} failed: {e.strerror or e}") from None
        if not args.quiet:
            sys.stdout.write(_summary(args.device, dev.size, fs))
            sys.stdout.flush()
    return EXIT_OK


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, MkfsOptions, dict[str, int | None]]:
    args = build_parser().parse_args(argv)
    numbers: dict[str, int | None] = {
        "journals": _number(args.journals, "number of journals (-j)", 1, 1 << 16),
        "journal_mb": None
        if args.journal_mb is None
        else _number(args.journal_mb, "journal size (-J)", MIN_JOURNAL_MB, MAX_JOURNAL_MB),
        "rgsize_mb": _number(
            args.rgsize_mb, "resource group size (-r)", MIN_RGSIZE_MB, MAX_RGSIZE_MB
        ),
        "bsize": _number(args.bsize, "block size (-b)", 512, MAX_BSIZE),
        "qc_mb": _number(args.qc_mb, "quota change size (-c)", 1, MAX_QCSIZE_MB),
        "blocks": None if args.blocks is None else _number(args.blocks, "BLOCKS", 1),
    }
    bsize = numbers["bsize"]
    assert bsize is not None
    if bsize & (bsize - 1):
        raise UsageError(
            f"block size (-b) must be a power of two between 512 and {MAX_BSIZE}, not {bsize}"
        )
    locktable = check_lock_args(args.lockproto, args.locktable)
    fs_uuid = None
    if args.uuid is not None:
        try:
            fs_uuid = uuid_mod.UUID(args.uuid)
        except ValueError:
            raise UsageError(f"invalid UUID {args.uuid!r}") from None
    opts = MkfsOptions(
        lockproto=args.lockproto,
        locktable=locktable,
        uuid=fs_uuid,
        qc_mb=numbers["qc_mb"] or DEFAULT_QCSIZE_MB,
        now=int(time.time()),
    )
    return args, opts, numbers


def main(argv: list[str] | None = None) -> int:
    """Entry point of `gfspy-mkfs`; returns the exit status."""
    logging.basicConfig(level=os.environ.get("GFSPY_LOG", "WARNING").upper(), stream=sys.stderr)
    try:
        args, opts, numbers = _parse(argv)
        return trio.run(_run, args, opts, numbers)
    except UsageError as e:
        print(f"{PROG}: {e} (see --help)", file=sys.stderr)
        return EXIT_USAGE
    except Refused as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_FAILED
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else EXIT_OK
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
