"""`gfspy-blockd`: export files and block devices over NBD, with a fencing control port."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import ssl
import sys

import trio

from gfspy.blockd.address import parse_hostport
from gfspy.blockd.backend import BackendError, FileBackend, detect_wwid
from gfspy.blockd.control import handle_control
from gfspy.blockd.fence_table import FenceTable, FenceTableError
from gfspy.blockd.server import DEFAULT_DRAIN_TIMEOUT, BlockServer, Export
from gfspy.blockd.tls import server_context
from gfspy.nbd.wire import NBD_DEFAULT_PORT

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

DESCRIPTION = """\
Serve files and block devices by name over the standard NBD protocol (fixed newstyle;
GO, INFO, EXPORT_NAME, LIST; READ, WRITE, FLUSH, FUA, TRIM, WRITE_ZEROES), so nbdinfo,
nbdcopy, qemu-img and gfspy's own client can use them.  Nothing is cached: I/O is
O_DIRECT where supported, FLUSH is fdatasync and FUA is RWF_DSYNC, so two servers may
export the same LUN.  Unaligned I/O is refused with EINVAL.

Client identity: with TLS the client certificate's CN is the node name.  Without TLS a
client may declare itself in the export name as NAME@NODE:INCARNATIONHEX (NOT
authenticated, for tests and trusted networks only); a plain NAME gets the anonymous
identity anon-<peer IP>.  A fenced node is refused (NBD_REP_ERR_POLICY "fenced") and its
open sessions get EPERM, until the node is unfenced or a new incarnation is admitted.

Each export's description (NBD_INFO_DESCRIPTION) reads "wwid=W; path=P; session=ID";
ID names this connection for SESSION_FENCE.
"""

EPILOG = """\
control channel:
  --control opens a TCP port taking length-prefixed msgpack requests: ADMIT, FENCE,
  UNFENCE, SESSION_FENCE, STATUS (see `gfspy fence`, `gfspy storage status`).  FENCE is
  answered CONFIRMED only after the ban is on disk and every I/O already dispatched for
  the node has finished and its connections are closed; FAILED otherwise.  With TLS the
  control channel needs TLS too, with a certificate whose CN is an --admin-cn, so a
  fenced node cannot unfence itself; without TLS, bind it to an address only the
  cluster managers can reach.

exit status:
  0  stopped by SIGTERM or SIGINT
  1  could not start: an export, the state directory, TLS files or a port failed
  2  bad usage
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gfspy-blockd",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "exports",
        nargs="+",
        metavar="NAME=PATH",
        help="export the file or block device PATH as NAME (the first is the default export)",
    )
    p.add_argument(
        "--listen",
        default=f"0.0.0.0:{NBD_DEFAULT_PORT}",
        metavar="HOST:PORT",
        help=f"NBD address (default 0.0.0.0:{NBD_DEFAULT_PORT}; port 0 picks a free one)",
    )
    p.add_argument("--control", metavar="HOST:PORT", help="control channel address (default: none)")
    p.add_argument(
        "--state", metavar="DIR", help="directory holding the fence table (default: memory only)"
    )
    p.add_argument("--tls-cert", metavar="FILE", help="server certificate (PEM); requires TLS")
    p.add_argument("--tls-key", metavar="FILE", help="server private key (PEM)")
    p.add_argument("--tls-ca", metavar="FILE", help="CA that signs client certificates (PEM)")
    p.add_argument(
        "--admin-cn",
        action="append",
        metavar="NAME",
        help="with TLS, certificate CN allowed on the control channel (repeatable; default: admin)",
    )
    p.add_argument(
        "--wwid",
        action="append",
        default=[],
        metavar="NAME=WWID",
        help="LUN identifier of export NAME (also accepted as its export name); "
        "block devices default to the WWID the kernel reports",
    )
    p.add_argument("--read-only", action="store_true", help="export everything read-only")
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=DEFAULT_DRAIN_TIMEOUT,
        metavar="SECONDS",
        help=f"FENCE fails if I/O has not drained by then (default {DEFAULT_DRAIN_TIMEOUT:g})",
    )
    p.add_argument(
        "--ready-file",
        metavar="FILE",
        help="once serving, write the bound addresses here as JSON (for scripts and tests)",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging threshold (default INFO)",
    )
    return p


class UsageError(Exception):
    pass


def _pairs(items: list[str], what: str) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or not name or not value:
            raise UsageError(f"{what} {item!r} is not NAME=VALUE")
        pairs.append((name, value))
    return pairs


def _open_exports(args: argparse.Namespace) -> list[Export]:
    specs = _pairs(args.exports, "export")
    names = [n for n, _ in specs]
    if len(set(names)) != len(names):
        raise UsageError("export names must be unique")
    if any("@" in n for n in names):
        raise UsageError("export names may not contain '@' (it separates the identity)")
    wwids = dict(_pairs(args.wwid, "--wwid"))
    unknown = set(wwids) - set(names)
    if unknown:
        raise UsageError(f"--wwid names an unknown export: {sorted(unknown)[0]}")
    exports = []
    for name, path in specs:
        backend = FileBackend(path, readonly=args.read_only)
        wwid = wwids.get(name) or (detect_wwid(path) if backend.is_blockdev else None)
        exports.append(Export(name, backend, wwid))
    return exports


def _log_startup(args: argparse.Namespace, server: BlockServer) -> None:
    """Say what is served, only once everything could be set up."""
    for export in server.exports:
        backend = export.backend
        log.info(
            "export %s: %s, %d bytes, block %d, %s%s",
            export.name,
            backend.path,
            backend.size,
            backend.block_size,
            "O_DIRECT" if backend.direct else "buffered (O_DIRECT unsupported)",
            f", wwid {export.wwid}" if export.wwid else "",
        )
    table = server.fence_table
    if table.path is None:
        log.warning("no --state directory: fence bans will not survive a restart")
    else:
        fenced = table.fenced_nodes()
        log.info("fence table %s: fenced nodes %s", table.path, fenced or "none")
    if server.tls_context is None:
        log.warning("no TLS: client identities are declared, not authenticated (insecure)")


def _write_ready_file(path: str, info: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(info, f)
    os.replace(tmp, path)


def _address_text(listener: trio.SocketListener) -> str:
    host, port = listener.socket.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _serve(args: argparse.Namespace, server: BlockServer) -> None:
    host, port = parse_hostport(args.listen, NBD_DEFAULT_PORT)
    nbd_listeners = await trio.open_tcp_listeners(port, host=host)
    control_listeners = []
    if args.control:
        chost, cport = parse_hostport(args.control)
        control_listeners = await trio.open_tcp_listeners(cport, host=chost)
    server.nbd_addresses = [_address_text(x) for x in nbd_listeners]
    control_addresses = [_address_text(x) for x in control_listeners]
    _log_startup(args, server)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run_background)
        nursery.start_soon(trio.serve_listeners, server.handle_nbd, nbd_listeners)
        if control_listeners:
            handler = functools.partial(
                handle_control,
                server,
                tls_context=server.tls_context,
                admins=frozenset(args.admin_cn or ["admin"]),
            )
            nursery.start_soon(trio.serve_listeners, handler, control_listeners)
        log.info(
            "serving NBD on %s, control on %s",
            ", ".join(server.nbd_addresses),
            ", ".join(control_addresses) or "(none)",
        )
        if args.ready_file:
            _write_ready_file(
                args.ready_file,
                {"pid": os.getpid(), "nbd": server.nbd_addresses, "control": control_addresses},
            )
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("got %s: shutting down", signal.Signals(signum).name)
                server.shutting_down = True
                nursery.cancel_scope.cancel()
                break


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s gfspy-blockd[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    tls_files = (args.tls_cert, args.tls_key, args.tls_ca)
    try:
        if any(tls_files) and not all(tls_files):
            raise UsageError("--tls-cert, --tls-key and --tls-ca go together")
        if args.admin_cn and not args.tls_cert:
            raise UsageError("--admin-cn needs TLS (--tls-cert, --tls-key, --tls-ca)")
        parse_hostport(args.listen, NBD_DEFAULT_PORT)
        if args.control:
            parse_hostport(args.control)
        if args.drain_timeout <= 0:
            raise UsageError("--drain-timeout must be positive")
    except (UsageError, ValueError) as e:
        print(f"gfspy-blockd: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        exports = _open_exports(args)
    except UsageError as e:
        print(f"gfspy-blockd: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BackendError as e:
        print(f"gfspy-blockd: cannot export {e.strerror}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        if args.state:
            os.makedirs(args.state, exist_ok=True)
        table = FenceTable(args.state)
        table.load()
        tls_context = server_context(*tls_files) if args.tls_cert else None
    except (OSError, ssl.SSLError, FenceTableError) as e:
        print(f"gfspy-blockd: {e}", file=sys.stderr)
        return EXIT_FAILURE
    server = BlockServer(exports, table, tls_context=tls_context, drain_timeout=args.drain_timeout)
    try:
        trio.run(_serve, args, server)
    except OSError as e:
        print(f"gfspy-blockd: cannot listen: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        pass
    finally:
        for export in exports:
            export.backend.close()
    return EXIT_OK
