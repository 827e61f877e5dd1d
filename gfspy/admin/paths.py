"""`gfspy paths`: show a multipath map's groups, paths and their states, like `multipath -ll`.

It opens the paths exactly as a mount would (same identity checks), runs one checker
round so every state is fresh, prints, and closes. Nothing is written to the device.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import trio

from gfspy.blockdev.device import DeviceError
from gfspy.blockdev.multipath import POLICIES, MultipathConfig, MultipathDevice
from gfspy.blockdev.remote import split_spec

EXIT_OK = 0
EXIT_DEGRADED = 1
EXIT_USAGE = 2

DESCRIPTION = """\
Open the NBD paths given as comma-separated URIs (nbd://HOST[:PORT]/EXPORT, or
nbds://...?tls-certificates=DIR for TLS with a client certificate; optionally
control=HOST:PORT for the server's control channel and node=NAME for the identity to
declare), check each once, and print the path groups with their states:

  group status:  active (in use), enabled (usable standby), failed (no usable path)
  path state:    active ready | failed faulty (with the reason) | fenced

Paths whose server reports a different WWID, size or block size than the first path are
not the same device; the map is then refused."""

EPILOG = """\
exit status:
  0  every path is ready
  1  the map could not be opened, or some path is failed or fenced
  2  bad usage"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "paths",
        help="show multipath groups, paths and states (like multipath -ll)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("spec", metavar="URI[,URI...]", help="the paths of one device")
    parser.add_argument(
        "--policy",
        choices=POLICIES,
        default="failover",
        help="path grouping: failover (one path per group, default) or multibus",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="connect and checker deadline per path (default 5)",
    )
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.timeout <= 0:
        print("gfspy paths: --timeout must be positive", file=sys.stderr)
        return EXIT_USAGE
    try:
        uris = split_spec(args.spec)
    except DeviceError as e:
        print(f"gfspy paths: {e.strerror}", file=sys.stderr)
        return EXIT_USAGE
    config = MultipathConfig(
        policy=args.policy,
        polling_interval=args.timeout,
        io_timeout=args.timeout,
        connect_timeout=args.timeout,
        no_path_retry=0,
    )
    try:
        status = trio.run(_collect, uris, config)
    except DeviceError as e:
        print(f"gfspy paths: {e.strerror or e}", file=sys.stderr)
        return EXIT_DEGRADED
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(format_status(status))
    healthy = all(p["ready"] for g in status["groups"] for p in g["paths"])
    return EXIT_OK if healthy else EXIT_DEGRADED


async def _collect(uris: list[str], config: MultipathConfig) -> dict[str, Any]:
    device = await MultipathDevice.open(uris, config, readonly=True)
    try:
        await device.check_paths()
        return device.status()
    finally:
        await device.aclose()


def format_status(status: dict[str, Any]) -> str:
    """Render like `multipath -ll`: a header, then a tree of groups and paths."""
    lines = [
        f"{status['name']} wwid={status['wwid'] or '-'} size={_human(status['size'])} "
        f"block={status['block_size']}",
        f"policy={status['policy']} selector={status['path_selector']} "
        f"failback={status['failback']} "
        f"no_path_retry={status['no_path_retry']}"
        + (f" FENCED: {status['fenced']}" if status["fenced"] else ""),
    ]
    groups = status["groups"]
    for gi, group in enumerate(groups):
        last_group = gi == len(groups) - 1
        lines.append(
            f"{'`' if last_group else '|'}-+- group {group['index']} status={group['status']}"
        )
        stem = " " if last_group else "|"
        for pi, path in enumerate(group["paths"]):
            corner = "`" if pi == len(group["paths"]) - 1 else "|"
            if path["state"] == "active" and path["ready"]:
                state = "active ready"
            elif path["state"] == "fenced":
                state = "fenced"
            else:
                state = "failed faulty"
            reason = f"  ({path['reason']})" if path["reason"] else ""
            lines.append(f"{stem} {corner}- {path['uri']}  {state:<13}{reason}".rstrip())
    return "\n".join(lines)


def _human(size: int) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if size < 1024 or unit == "T":
            return f"{size:g}{unit}"
        size /= 1024  # type: ignore[assignment]
    return str(size)
