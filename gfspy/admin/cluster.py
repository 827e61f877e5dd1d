"""`gfspy status`, `gfspy lockdump` and `gfspy fence-ack`: talk to the local node daemon.

They speak to the daemon's admin Unix socket (see gfspy/cluster/admin_wire.py), so they
work whatever state the cluster is in, including while recovery is blocked on a fence:
that is exactly when an operator needs them.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import textwrap
import time
from typing import Any

from gfspy.cluster import admin_wire

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
SOCKET_DIR = "/run/gfspy"

SOCKET_HELP = (
    "the node daemon's admin socket (default: $GFSPY_CLUSTER_SOCKET, else the only "
    f"socket in {SOCKET_DIR})"
)

EXIT_EPILOG = "exit status:\n  0  success\n  1  the daemon could not be reached or the operation failed\n  2  bad usage"

FENCE_ACK_WARNING = """\
WARNING: manual fence acknowledgement of node {node}.

You are telling the cluster that node {node} can no longer write to the shared
storage: it is powered off, or disconnected from every storage path, and will
stay so until it restarts and rejoins.  Recovery will then release its locks
and replay its journal.  If node {node} is in fact still running, two nodes
will write the same blocks and the filesystem WILL be corrupted.

Only continue if you have checked node {node} yourself."""


class CommandError(Exception):
    """One line for stderr; the command exits 1."""


def _socket_path(args: argparse.Namespace) -> str:
    if args.socket:
        return args.socket
    env = os.environ.get("GFSPY_CLUSTER_SOCKET")
    if env:
        return env
    found = sorted(glob.glob(os.path.join(SOCKET_DIR, "*.sock")))
    if len(found) == 1:
        return found[0]
    if not found:
        raise CommandError(f"no node daemon socket in {SOCKET_DIR}; give --socket PATH")
    raise CommandError(f"several daemon sockets in {SOCKET_DIR}; choose one with --socket")


def _call(args: argparse.Namespace, op: str, **kw: Any) -> dict[str, Any]:
    try:
        answer = admin_wire.call(_socket_path(args), op, **kw)
    except admin_wire.AdminWireError as exc:
        raise CommandError(str(exc)) from None
    if not answer.get("ok"):
        raise CommandError(str(answer.get("error", "the daemon refused the request")))
    return answer


def _run(func: Any, args: argparse.Namespace) -> int:
    try:
        return func(args)
    except CommandError as exc:
        print(f"gfspy {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def format_status(s: dict[str, Any]) -> str:
    q = s["quorum"]
    lines = [
        f"cluster {s['cluster']}  node {s['node_id']} ({s['name']})  "
        f"incarnation {s['incarnation']:#x}  state {s['state']}",
        f"view epoch {s['epoch']}  quorum: "
        + ("yes" if q["quorate"] else "NO")
        + f" ({q['votes']} of {q['expected_votes']} votes, {q['quorum']} needed"
        + (f", {q['witness_votes']} witness" if q["witness_votes"] else "")
        + ")"
        + (f"  {q['reason']}" if q["reason"] else ""),
    ]
    if s.get("expelled"):
        lines.append(f"EXPELLED: {s['expelled']}")
    rec = s["recovery"]
    lines.append(
        "locking: "
        + ("stopped" if rec["stopped"] else f"running (view {rec['started_epoch']})")
        + (f"; waiting for {rec['waiting_for']}" if rec["waiting_for"] else "")
    )
    if s.get("lockspaces"):
        lines.append("lockspaces: " + ", ".join(s["lockspaces"]))
    for problem in s.get("fence_self_test", []):
        lines.append(f"FENCE PATH BROKEN: {problem}")
    lines.append("members:")
    for m in s["members"]:
        lines.append(
            f"  {m['id']:>4}  {m['name']:<16} {m['address']:<22} "
            f"inc {m['incarnation']:#x}  " + ("alive" if m["alive"] else "NOT HEARD")
        )
    pending = [f for f in s["fences"] if not f["done"]]
    if pending:
        lines.append("fencing outstanding:")
        for f in pending:
            lines.append(
                f"  node {f['node_id']} inc {f['incarnation']:#x} removed in view "
                f"{f['epoch']} at {_when(f['failed_at'])}: {f['attempts']} failed "
                f"attempts; last error: {f['last_error'] or '-'}"
            )
    lines.append("fence history:" if s["fence_history"] else "fence history: none")
    for r in s["fence_history"][-20:]:
        lines.append(
            f"  {_when(r['when'])}  node {r['node_id']} inc {r['incarnation']:#x}  "
            f"{r['method']:<8} {'OK    ' if r['ok'] else 'FAILED'} by node {r['actor']}: "
            f"{r['detail']}"
        )
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    status = _call(args, "status")
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print(format_status(status))
    return EXIT_OK


def format_lockdump(d: dict[str, Any]) -> str:
    lines = [
        f"lockspace {d.get('lockspace')}"
        + (f"  view {d['epoch']}" if "epoch" in d else "")
        + ("" if d.get("running", True) else "  (STOPPED: membership change in progress)")
    ]
    resources = d.get("resources", [])
    lines.append("resources mastered here:" if resources else "resources mastered here: none")
    for r in resources:
        lines.append(
            f"  {r.get('name')!s}  master {r.get('master', '-')}"
            + (f"  lvbseq {r['lvbseq']}" if "lvbseq" in r else "")
            + ("  LVB INVALID" if r.get("lvb_invalid") else "")
        )
        for queue in ("granted", "convert", "waiting"):
            for lk in r.get(queue, []):
                lines.append(f"    {queue:<8} {lk}")
    locks = d.get("locks", [])
    lines.append("locks held or requested by this node:" if locks else "locks of this node: none")
    for lk in locks:
        lines.append(
            f"  lkid {lk['lkid']:<6} {lk['name']!s:<24} {lk['mode']:<3} master {lk['master']}"
            + (f"  ({lk['op']} in progress)" if lk.get("op") else "")
        )
    return "\n".join(lines)


def cmd_lockdump(args: argparse.Namespace) -> int:
    dump = _call(args, "lockdump", lockspace=args.lockspace)
    dump.pop("ok", None)
    print(
        json.dumps(dump, indent=2, sort_keys=True, default=str)
        if args.json
        else format_lockdump(dump)
    )
    return EXIT_OK


def cmd_fence_ack(args: argparse.Namespace) -> int:
    node = args.node
    if not args.yes:
        print(FENCE_ACK_WARNING.format(node=node), file=sys.stderr)
        print(
            f"\nType 'yes' to acknowledge that node {node} is fenced: ",
            end="",
            file=sys.stderr,
            flush=True,
        )
        reply = sys.stdin.readline().strip().lower()
        if reply != "yes":
            print(
                f"gfspy fence-ack: not acknowledged; node {node} is still waiting to be fenced",
                file=sys.stderr,
            )
            return EXIT_FAILED
    answer = _call(args, "fence_ack", node=node)
    pending = answer.get("pending", [])
    what = (
        f"{len(pending)} outstanding fence(s) will complete"
        if pending
        else "no fence is outstanding for it now; the acknowledgement is recorded"
    )
    print(f"fence of node {answer['node']} acknowledged; {what}")
    return EXIT_OK


def _wrap(text: str) -> str:
    return textwrap.fill(text, 78)


def register(subparsers: Any) -> None:
    """Add status, lockdump and fence-ack to the `gfspy` command."""
    fmt = argparse.RawDescriptionHelpFormatter

    p = subparsers.add_parser(
        "status",
        help="members, view epoch, quorum, fencing",
        description=_wrap(
            "Show this node's view of the cluster: members and whether they are "
            "heard, the view epoch, quorum, what recovery waits for, outstanding "
            "fences and the fence history."
        ),
        epilog=EXIT_EPILOG,
        formatter_class=fmt,
    )
    p.add_argument("--socket", metavar="PATH", help=SOCKET_HELP)
    p.add_argument("--json", action="store_true", help="print the raw status as JSON")
    p.set_defaults(func=lambda a: _run(cmd_status, a))

    p = subparsers.add_parser(
        "lockdump",
        help="resources, masters and queues of a lockspace",
        description=_wrap(
            "Dump a DLM lockspace as this node sees it: each resource, its master, "
            "its granted/convert/waiting queues and its LVB state."
        ),
        epilog=EXIT_EPILOG,
        formatter_class=fmt,
    )
    p.add_argument("lockspace", metavar="LOCKSPACE", help="lockspace name (the filesystem)")
    p.add_argument("--socket", metavar="PATH", help=SOCKET_HELP)
    p.add_argument("--json", action="store_true", help="print the raw dump as JSON")
    p.set_defaults(func=lambda a: _run(cmd_lockdump, a))

    p = subparsers.add_parser(
        "fence-ack",
        help="acknowledge by hand that a failed node is fenced",
        description=_wrap(
            "Tell the cluster that NODE (id or name) has been fenced by hand (it is "
            "off, or cut off from the storage). Recovery of a node whose fence "
            "method is 'manual' waits for this. The acknowledgement is recorded "
            "in the fence history like any fence. Asks for confirmation unless "
            "--yes is given."
        ),
        epilog=EXIT_EPILOG + "\n  (declining the confirmation exits 1)",
        formatter_class=fmt,
    )
    p.add_argument("node", metavar="NODE", help="node id or name from cluster.toml")
    p.add_argument(
        "--yes",
        action="store_true",
        help="do not ask for confirmation (you have checked the node is off)",
    )
    p.add_argument("--socket", metavar="PATH", help=SOCKET_HELP)
    p.set_defaults(func=lambda a: _run(cmd_fence_ack, a))
