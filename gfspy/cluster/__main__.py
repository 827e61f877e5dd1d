"""`python -m gfspy.cluster`: run one node's cluster daemon."""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import secrets
import signal
import sys

import trio

from gfspy.cluster.config import ConfigError, load_config, load_key
from gfspy.cluster.daemon import EXIT_EXPELLED, DaemonError, Expulsion, NodeDaemon

log = logging.getLogger("gfspy.cluster")

EPILOG = """\
order on a membership change:
  agree a new view -> stop locking -> check quorum -> fence every removed node
  (confirmed at every block server, or by its agent, or by `gfspy fence-ack`) ->
  DLM recovery -> resume.  Nothing is skipped on a timeout; while a step cannot
  complete, locking stays stopped and `gfspy status` says what it waits for.

exit status:
  0  left the cluster on SIGTERM or SIGINT: locking stopped, then the members
     were told, so they remove this node without fencing it
  1  could not start (heartbeat address, status socket, state directory or
     cluster key unusable), or could not record its epoch
  2  bad usage or bad cluster.toml
  3  this node was removed from the cluster (expelled); it must restart, which
     gives it a new incarnation that joins through fencing like any new node
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gfspy.cluster",
        description=(
            "Run the cluster daemon of one node: heartbeats on their own UDP socket,\n"
            "agreed membership views numbered by epoch, quorum, fencing of failed\n"
            "nodes, and the stop/start of DLM lockspaces in the safe order."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, metavar="FILE", help="cluster.toml")
    parser.add_argument(
        "--node", required=True, metavar="ID", type=int, help="this node's id in cluster.toml"
    )
    parser.add_argument(
        "--status-socket",
        metavar="PATH",
        help="Unix socket for gfspy status/lockdump/fence-ack (default /run/gfspy/CLUSTER-ID.sock)",
    )
    parser.add_argument(
        "--lockspace",
        action="append",
        default=[],
        metavar="NAME",
        help="open a DLM lockspace NAME (repeatable)",
    )
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        default="/var/lib/gfspy",
        help="where the node keeps the highest view epoch it agreed to, so that epochs "
        "never repeat across restarts (default /var/lib/gfspy)",
    )
    parser.add_argument(
        "--incarnation",
        metavar="HEX",
        help="use this incarnation instead of a fresh random one "
        "(testing only: an old incarnation is refused by the cluster)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging threshold (default INFO)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status documented in --help."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # `kill -USR1` dumps every thread's stack to stderr: how to see where a wedged
    # daemon is stuck without stopping it.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    logging.basicConfig(
        level=args.log_level,
        format=f"%(asctime)s node{args.node} %(name)s %(levelname)s %(message)s",
    )
    try:
        config = load_config(args.config)
        config.node(args.node)
    except ConfigError as exc:
        print(f"gfspy-cluster: {exc}", file=sys.stderr)
        return 2
    if args.incarnation is not None:
        try:
            incarnation = int(args.incarnation, 16)
            if not 0 < incarnation < 1 << 64:
                raise ValueError
        except ValueError:
            print(
                f"gfspy-cluster: --incarnation {args.incarnation!r}: expected a non-zero "
                "64-bit hexadecimal number",
                file=sys.stderr,
            )
            return 2
    else:
        incarnation = secrets.randbits(63) | 1
    try:
        key = load_key(config)
    except ConfigError as exc:
        print(f"gfspy-cluster: {exc}", file=sys.stderr)
        return 1
    if key is None:
        log.warning("no [cluster] key_file: heartbeat and membership datagrams are not "
                    "authenticated; use a trusted network")  # fmt: skip
    status_socket = args.status_socket or f"/run/gfspy/{config.name}-{args.node}.sock"
    daemon = NodeDaemon(
        config, args.node, incarnation, status_socket, args.lockspace, args.state_dir, key
    )
    try:
        os.makedirs(os.path.dirname(status_socket) or ".", exist_ok=True)
        os.makedirs(args.state_dir, exist_ok=True)
        daemon.load_epoch()
    except OSError as exc:
        print(f"gfspy-cluster: node {args.node}: cannot start: {exc}", file=sys.stderr)
        return 1
    try:
        return trio.run(_run, daemon)
    except KeyboardInterrupt:
        return 0


async def _run(daemon: NodeDaemon) -> int:
    node_id = daemon.my_id
    outcome = 0
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)

                async def stop_on_signal() -> None:
                    async for signum in signals:
                        log.info("node %d: %s, leaving", node_id, signal.Signals(signum).name)
                        with trio.move_on_after(5):
                            await daemon.leave()
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(stop_on_signal)
    except* Expulsion as group:
        print(
            f"gfspy-cluster: node {node_id}: removed from the cluster: {_leaf(group)}",
            file=sys.stderr,
        )
        outcome = EXIT_EXPELLED
    except* DaemonError as group:
        print(f"gfspy-cluster: node {node_id}: {_leaf(group)}", file=sys.stderr)
        outcome = 1
    except* OSError as group:
        print(f"gfspy-cluster: node {node_id}: cannot start: {_leaf(group)}", file=sys.stderr)
        outcome = 1
    return outcome


def _leaf(exc: BaseException) -> BaseException:
    """The first real exception inside (nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


if __name__ == "__main__":
    sys.exit(main())
