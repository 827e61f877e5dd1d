"""`gfspy`: status, paths, storage servers, fencing and locks.

Each area registers its own subcommands from its own module (see SUBCOMMAND_MODULES),
so this file stays a dispatcher.

Exit codes: 0 success, 1 the operation failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: Modules that each define `register(subparsers)`; every subcommand parser they add sets
#: `func`, a callable taking the parsed args and returning an exit code.
SUBCOMMAND_MODULES: list[str] = ["gfspy.admin.cluster", "gfspy.admin.paths", "gfspy.admin.storage"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gfspy",
        description="Administer a gfspy cluster: nodes, paths, storage servers, fencing, locks.",
        epilog="Exit status: 0 success, 1 the operation failed, 2 bad usage.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
