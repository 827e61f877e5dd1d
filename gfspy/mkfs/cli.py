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
from dataclasses import dataclass
from typing import NoReturn, TextIO

import trio

from gfspy.blockdev.device import Device, DeviceError, open_device

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
from .writer import discard_device, write_filesystem

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

On block devices and NBD exports the old contents are discarded first (TRIM/UNMAP,
unless -K), as mkfs.gfs2 does; image files are never discarded.

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
        description="Make a GFS2 filesystem (format 1802) on DEVICE, laid out exactly as\n"
        "mkfs.gfs2 lays it out, for gfspy and for the Linux gfs2 module.",
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
        "-K",
        dest="no_discard",
        action="store_true",
        help="do not discard the device's old contents first (block devices and NBD only)",
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
    one line per quarter of the work otherwise, so logs of big runs stay short."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.last_quarter: dict[str, int] = {}
        self.last_time = 0.0

    def __call__(self, what: str, done: int, total: int) -> None:
        if self.tty:
            now = time.monotonic()
            if done == total or now - self.last_time >= 0.1:
                self.last_time = now
                self.stream.write(f"\r{what}: {done}/{total}" + ("\n" if done == total else ""))
                self.stream.flush()
            return
        quarter = done * 4 // total
        if self.last_quarter.get(what) != quarter:
            self.last_quarter[what] = quarter
            self.stream.write(f"{what}: {done}/{total}\n")
            self.stream.flush()


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


@dataclass(frozen=True, slots=True)
class Request:
    """A fully checked command line."""

    device: str
    overwrite: bool
    quiet: bool
    discard: bool
    bsize: int
    journals: int
    journal_mb: int | None
    rgsize_mb: int
    fs_blocks: int | None
    options: MkfsOptions


def parse_request(argv: list[str] | None) -> Request:
    """Parse and check the command line; UsageError says what is wrong."""
    args = build_parser().parse_args(argv)
    bsize = _number(args.bsize, "block size (-b)", 512, MAX_BSIZE)
    if bsize & (bsize - 1):
        raise UsageError(
            f"block size (-b) must be a power of two between 512 and {MAX_BSIZE}, not {bsize}"
        )
    journals = _number(args.journals, "number of journals (-j)", 1, 1 << 16)
    journal_mb = None
    if args.journal_mb is not None:
        journal_mb = _number(args.journal_mb, "journal size (-J)", MIN_JOURNAL_MB, MAX_JOURNAL_MB)
    rgsize_mb = _number(args.rgsize_mb, "resource group size (-r)", MIN_RGSIZE_MB, MAX_RGSIZE_MB)
    qc_mb = _number(args.qc_mb, "quota change size (-c)", 1, MAX_QCSIZE_MB)
    fs_blocks = None if args.blocks is None else _number(args.blocks, "BLOCKS", 1)
    locktable = check_lock_args(args.lockproto, args.locktable)
    fs_uuid = None
    if args.uuid is not None:
        try:
            fs_uuid = uuid_mod.UUID(args.uuid)
        except ValueError:
            raise UsageError(f"invalid UUID {args.uuid!r}") from None
    options = MkfsOptions(
        lockproto=args.lockproto,
        locktable=locktable,
        uuid=fs_uuid,
        qc_mb=qc_mb,
        now=int(time.time()),
    )
    return Request(
        device=args.device,
        overwrite=args.overwrite,
        quiet=args.quiet,
        discard=not args.no_discard,
        bsize=bsize,
        journals=journals,
        journal_mb=journal_mb,
        rgsize_mb=rgsize_mb,
        fs_blocks=fs_blocks,
        options=options,
    )


async def _plan(req: Request, dev: Device) -> BuiltFilesystem:
    """Every check that needs the device, then the whole build; nothing is written."""
    if req.bsize < dev.block_size:
        raise Refused(
            f"block size {req.bsize} is smaller than the device's sector size {dev.block_size}"
        )
    probe_len = min(PROBE_BYTES, dev.size - dev.size % dev.block_size)
    found = detect(await dev.read(0, probe_len)) if probe_len > 0 else None
    if found and not req.overwrite:
        raise Refused(
            f"{req.device} appears to contain an existing {found} filesystem; "
            "use -O to overwrite it"
        )
    try:
        layout = compute_layout(
            device_bytes=dev.size,
            bsize=req.bsize,
            journals=req.journals,
            journal_mb=req.journal_mb,
            rgsize_mb=req.rgsize_mb,
            fs_blocks=req.fs_blocks,
        )
        return build_filesystem(layout, req.options)
    except GeometryError as e:
        raise Refused(f"{req.device}: {e}") from None
    except OutOfSpace:
        raise Refused(f"{req.device}: device too small for the system files") from None
    except DirectoryTooLarge as e:
        raise Refused(f"{req.device}: unsupported layout: {e}") from None


async def run(req: Request) -> int:
    """Make the filesystem described by `req`; Refused if it must not or cannot."""
    try:
        dev = await open_device(req.device)
    except DeviceError as e:
        raise Refused(f"cannot open {e.strerror or req.device}") from None
    async with dev:
        fs = await _plan(req, dev)
        show_progress = not req.quiet and (sys.stderr.isatty() or dev.size >= LARGE_DEVICE)
        try:
            if req.discard:
                await discard_device(dev, fs.layout.fs_blocks * fs.layout.bsize)
            await write_filesystem(dev, fs, _Progress(sys.stderr) if show_progress else None)
        except DeviceError as e:
            raise Refused(f"writing {req.device} failed: {e.strerror or e}") from None
        log.info("%s: made gfs2 with %d journals", req.device, req.journals)
        if not req.quiet:
            sys.stdout.write(_summary(req.device, dev.size, fs))
            sys.stdout.flush()
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of `gfspy-mkfs`; returns the exit status."""
    logging.basicConfig(level=os.environ.get("GFSPY_LOG", "WARNING").upper(), stream=sys.stderr)
    try:
        return trio.run(run, parse_request(argv))
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
