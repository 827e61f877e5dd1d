"""`gfspy storage status`, `gfspy fence` and `gfspy unfence`: talk to gfspy-blockd.

A node counts as fenced only when *every* storage server confirmed, so `gfspy fence`
asks all listed servers in parallel and succeeds only if all of them answer CONFIRMED.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
from typing import Any

import trio

from gfspy.blockd.control_client import (
    ControlError,
    fence_node,
    server_status,
    unfence_node,
)
from gfspy.blockd.tls import client_context

EXIT_OK = 0
EXIT_FAILED = 1

_EXIT_EPILOG = (
    "exit status: 0 success, 1 the operation failed or a server did not answer, 2 bad usage"
)


def _incarnation(text: str) -> int:
    try:
        value = int(text, 16)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a hexadecimal incarnation") from None
    if not 0 <= value < 1 << 64:
        raise argparse.ArgumentTypeError("incarnation must fit in 64 bits")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _add_tls_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "TLS", "needed when the servers run with TLS: an administrator certificate"
    )
    group.add_argument("--tls-cert", metavar="FILE", help="our certificate (PEM, CN admin)")
    group.add_argument("--tls-key", metavar="FILE", help="its private key (PEM)")
    group.add_argument("--tls-ca", metavar="FILE", help="CA of the servers' certificates")


class _SetupError(Exception):
    pass


def _ssl_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    files = (args.tls_cert, args.tls_key, args.tls_ca)
    if not any(files):
        return None
    if not all(files):
        raise _SetupError("--tls-cert, --tls-key and --tls-ca go together")
    try:
        return client_context(*files)
    except (OSError, ssl.SSLError) as e:
        raise _SetupError(f"cannot load TLS files: {e}") from None


def register(subparsers: Any) -> None:
    storage = subparsers.add_parser(
        "storage",
        help="inspect gfspy-blockd storage servers",
        description="Inspect gfspy-blockd storage servers through their control channel.",
        epilog=_EXIT_EPILOG,
    )
    storage_sub = storage.add_subparsers(dest="storage_command", metavar="ACTION", required=True)
    status = storage_sub.add_parser(
        "status",
        help="exports, sessions and fence table of one server",
        description="Show one server's exports, live NBD sessions (node, incarnation, peer, "
        "I/O in flight) and its fence table.",
        epilog=_EXIT_EPILOG,
    )
    status.add_argument("--control", required=True, metavar="HOST:PORT", help="control address")
    status.add_argument("--json", action="store_true", help="print the raw answer as JSON")
    status.add_argument("--timeout", type=_positive_float, default=10.0, metavar="SECONDS")
    _add_tls_options(status)
    status.set_defaults(func=cmd_status)

    fence = subparsers.add_parser(
        "fence",
        help="fence a node at storage servers",
        description="Fence NODE at every listed gfspy-blockd server in parallel.  Each server "
        "records the ban on disk, stops the node's I/O, waits for I/O already running to "
        "finish and closes its connections before it confirms.  Succeeds only if every "
        "server confirms.",
        epilog=_EXIT_EPILOG,
    )
    fence.add_argument("node", metavar="NODE", help="node name (certificate CN or declared)")
    fence.add_argument(
        "--server",
        action="append",
        required=True,
        metavar="HOST:PORT",
        help="control address of a server; repeat for every server",
    )
    fence.add_argument("--epoch", type=_non_negative, default=0, help="membership epoch (0)")
    fence.add_argument(
        "--incarnation",
        type=_incarnation,
        metavar="HEX",
        help="fence only this incarnation (default: all of them)",
    )
    fence.add_argument(
        "--timeout",
        type=_positive_float,
        default=120.0,
        metavar="SECONDS",
        help="give up on a server that has not answered by then (120)",
    )
    _add_tls_options(fence)
    fence.set_defaults(func=cmd_fence)

    unfence = subparsers.add_parser(
        "unfence",
        help="lift a node's fence at storage servers",
        description="Lift every ban on NODE at the listed servers (manual unfence).  Only do "
        "this after the node has rebooted or rejoined: an unfenced node that still has "
        "stale I/O queued can corrupt the filesystem.",
        epilog=_EXIT_EPILOG,
    )
    unfence.add_argument("node", metavar="NODE", help="node name")
    unfence.add_argument(
        "--server", action="append", required=True, metavar="HOST:PORT", help="control address"
    )
    unfence.add_argument(
        "--epoch",
        type=_non_negative,
        help="membership epoch; refused if older than the fence (default: override)",
    )
    unfence.add_argument("--timeout", type=_positive_float, default=30.0, metavar="SECONDS")
    _add_tls_options(unfence)
    unfence.set_defaults(func=cmd_unfence)


async def _call_all(servers: list[str], call: Any) -> dict[str, dict]:
    """Run `call(server)` for every server at once; errors become FAILED answers."""
    results: dict[str, dict] = {}

    async def one(server: str) -> None:
        try:
            results[server] = await call(server)
        except ControlError as e:
            results[server] = {"status": "UNREACHABLE", "reason": str(e)}

    async with trio.open_nursery() as nursery:
        for server in dict.fromkeys(servers):
            nursery.start_soon(one, server)
    return results


def _report(results: dict[str, dict], want: str) -> int:
    ok = True
    for server, answer in results.items():
        status = answer.get("status", "?")
        reason = answer.get("reason")
        print(f"{server}: {status}" + (f": {reason}" if reason else ""))
        ok = ok and status == want
    return EXIT_OK if ok else EXIT_FAILED


def cmd_fence(args: argparse.Namespace) -> int:
    try:
        context = _ssl_context(args)
    except _SetupError as e:
        print(f"gfspy fence: {e}", file=sys.stderr)
        return EXIT_FAILED

    async def call(server: str) -> dict:
        return await fence_node(
            server,
            args.node,
            args.epoch,
            args.incarnation,
            timeout=args.timeout,
            ssl_context=context,
        )

    results = trio.run(_call_all, args.server, call)
    code = _report(results, "CONFIRMED")
    if code != EXIT_OK:
        print(f"gfspy fence: node {args.node} is NOT fenced at every server", file=sys.stderr)
    return code


def cmd_unfence(args: argparse.Namespace) -> int:
    try:
        context = _ssl_context(args)
    except _SetupError as e:
        print(f"gfspy unfence: {e}", file=sys.stderr)
        return EXIT_FAILED

    async def call(server: str) -> dict:
        return await unfence_node(
            server, args.node, args.epoch, timeout=args.timeout, ssl_context=context
        )

    return _report(trio.run(_call_all, args.server, call), "OK")


def cmd_status(args: argparse.Namespace) -> int:
    try:
        context = _ssl_context(args)
        answer = trio.run(
            lambda: server_status(args.control, timeout=args.timeout, ssl_context=context)
        )
    except (ControlError, _SetupError) as e:
        print(f"gfspy storage status: {e}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
        return EXIT_OK if answer.get("status") == "OK" else EXIT_FAILED
    if answer.get("status") != "OK":
        print(f"gfspy storage status: {answer.get('reason', answer)}", file=sys.stderr)
        return EXIT_FAILED
    server = answer.get("server", {})
    print(
        f"server pid {server.get('pid')} boot {server.get('boot_id')} "
        f"nbd {','.join(server.get('nbd', []))} tls {'yes' if server.get('tls') else 'no'}"
    )
    print("exports:")
    for e in answer.get("exports", []):
        print(
            f"  {e['name']:<16} {e['size']:>14} bytes  block {e['block_size']:<5} "
            f"{'direct' if e['direct'] else 'buffered'}{' ro' if e['readonly'] else ''}  "
            f"{e.get('wwid') or '-'}  {e['path']}"
        )
    print("sessions:")
    sessions = answer.get("sessions", [])
    if not sessions:
        print("  (none)")
    for s in sessions:
        print(
            f"  {s['session_id']:<12} node {s['node']} inc {s['incarnation'] or '-'} "
            f"peer {s['peer']} export {s['export']} in-flight {s['in_flight']} "
            f"queued {s['queued']}{' FENCING' if s['fencing'] else ''}"
            f"{' CLOSING' if s.get('closing') else ''}"
            f"{'' if s['authenticated'] else ' (unauthenticated)'}"
        )
    print("fence table:")
    table = answer.get("fence_table", {})
    if not table:
        print("  (empty)")
    for node, rec in table.items():
        state = "FENCED" if rec["fenced_all"] or rec["banned"] else "admitted"
        print(
            f"  {node}: {state} all={rec['fenced_all']} banned={','.join(rec['banned']) or '-'} "
            f"admitted={rec['admitted'] or '-'} epoch={rec['epoch']}"
        )
    return EXIT_OK
