"""gfspy-fsck: the command line of the read-only GFS2 checker."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn

import trio

from gfspy.blockdev import DeviceError, open_device
from gfspy.fsck.checker import check_device
from gfspy.fsck.errors import OperationalError
from gfspy.fsck.reader import OutOfDevice
from gfspy.fsck.report import Report

log = logging.getLogger(__name__)

PROG = "gfspy-fsck"

# Exit codes as fsck(8) defines them.
EXIT_CLEAN = 0
EXIT_UNCORRECTED = 4
EXIT_OPERATIONAL = 8
EXIT_USAGE = 16
EXIT_CANCELLED = 32

DESCRIPTION = """\
Check a GFS2 filesystem (as made by mkfs.gfs2 or gfspy-mkfs) without changing it.

gfspy-fsck reads the superblock, the resource-group index, every resource group
header and bitmap, every dinode and its metadata tree, directories (entries, hashes,
'.' and '..', hash tables and leaves), extended attributes, link counts, the statfs
totals, the system files (jindex, per_node, inum, statfs, rindex, quota) and every
journal. Each problem is printed on one line naming the block or inode concerned,
followed by a summary.

The device is opened read-only and is never written. DEVICE is an image file, a block
device, or an nbd:// URI (comma-separated URIs for multipath). Check a filesystem
that no node has mounted: changes in flight on a mounted one show up as problems.

A journal whose head lacks the UNMOUNT flag is reported as "dirty ... replay needed"
and counts as a problem (exit 4). fsck.gfs2 -n instead notes a dirty journal and exits
0; gfspy-fsck does not, because the metadata it checked may be stale until the journal
is replayed.
"""

EPILOG = """\
exit status (as fsck(8)):
  0   no problems found
  4   problems found and left uncorrected
  8   operational error: the device cannot be opened or read, is too small or
      truncated, or does not hold a GFS2 filesystem
  16  usage error, including -y and -p (repair is not available yet)
  32  interrupted by the user

examples:
  gfspy-fsck -n /srv/gfs2.img
  gfspy-fsck -n -v nbd://storage1:10809/lun0
"""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line with fsck's usage code."""

    def error(self, message: str) -> NoReturn:
        print(f"{PROG}: {message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-n",
        "--no",
        action="store_true",
        help="check only, answer no to every repair (the default; the device is never written)",
    )
    parser.add_argument(
        "-y", "--yes", action="store_true", help="repair everything (not available yet: exit 16)"
    )
    parser.add_argument(
        "-p",
        "-a",
        "--preen",
        dest="preen",
        action="store_true",
        help="repair what is safe without asking (not available yet: exit 16)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="also print progress and per-journal state"
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="print problems only, no summary line"
    )
    parser.add_argument("device", metavar="DEVICE", help="image file, block device or nbd:// URI")
    return parser


async def _run(spec: str, report: Report) -> int:
    try:
        device = await open_device(spec, readonly=True)
    except DeviceError as e:
        why = str(e.strerror or e).removeprefix(f"{spec}: ")
        raise OperationalError(f"cannot open {spec}: {why}") from None
    async with device:
        try:
            fsck = await check_device(device, report)
        except DeviceError as e:
            why = str(e.strerror or e).removeprefix(f"{spec}: ")
            raise OperationalError(f"{spec}: read error: {why}") from None
        except OutOfDevice as e:
            raise OperationalError(f"{spec}: {e} (truncated image?)") from None
    del fsck
    return EXIT_UNCORRECTED if report.total else EXIT_CLEAN


def main(argv: list[str] | None = None) -> int:
    """Entry point of gfspy-fsck; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.yes or args.preen:
        flag = "-y" if args.yes else "-p"
        print(
            f"{PROG}: repair ({flag}) is not available yet; run with -n to check only",
            file=sys.stderr,
        )
        return EXIT_USAGE
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format=f"{PROG}: %(message)s",
    )
    report = Report(verbose=args.verbose)
    try:
        status = trio.run(_run, args.device, report)
    except OperationalError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_OPERATIONAL
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_CANCELLED
    except Exception as e:  # a bug must not show a traceback; say what and where
        log.debug("internal error", exc_info=True)
        print(f"{PROG}: internal error while checking {args.device}: {e!r}", file=sys.stderr)
        return EXIT_OPERATIONAL
    if not args.quiet:
        print(report.summary(args.device))
    return status


if __name__ == "__main__":
    sys.exit(main())
