"""mount.gfspy: mount a GFS2 filesystem through FUSE, the way a mount(8) helper does.

Lifecycle, in order: open the device, mount the filesystem (journal replay, orphan
cleanup), mount FUSE, wait for the kernel's INIT, raise the FUSE bdi's readahead,
report ready, serve until unmounted, then close the filesystem cleanly (log flush,
statfs fold, clean-unmount log header) and the device.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import faulthandler
import gc
import logging
import logging.handlers
import os
import signal
import sys

import pyfuse3
import trio

from gfspy.blockdev.device import open_device
from gfspy.fs.api import FileSystem, FsError
from gfspy.fuse import killpriv
from gfspy.fuse.daemon import ReadyPipe, run_detached
from gfspy.fuse.mount_record import DaemonRecord
from gfspy.fuse.operations import GfspyOperations
from gfspy.fuse.options import MountOptions, OptionError, parse_options

log = logging.getLogger(__name__)

PROG = "mount.gfspy"
EXIT_OK = 0
EXIT_USAGE = 1
EXIT_SERVE_FAILED = 2
EXIT_MOUNT_FAILED = 32
#: FUSE never sends more than 1 MiB per request; let reads arrive that large.
READ_AHEAD_KB = 1024

EPILOG = """\
options (-o, comma-separated; generic flags such as nosuid, nodev, noexec, noatime
are passed to the kernel, and mount(8)'s own such as defaults, noauto, _netdev
are ignored):
  ro, rw             mount read-only (nothing is written; a dirty journal is
                     refused until a read-write mount replays it) or
                     read-write (the default)
  lockproto=NAME     override the superblock's lock protocol: lock_nolock for
                     single-node use (lock_dlm needs a cluster configuration)
  hostdata=jid=N     use journal N (default 0)
  commit=SECONDS     flush the journal at least this often (default 60)
  errors=withdraw    on a metadata inconsistency stop all I/O and return EIO
                     (the default and only policy)
  allow_other        let users other than the mounter use the filesystem
  nokillpriv         leave clearing set-id bits on write, truncate and chown to
                     the kernel, which then asks the daemon for
                     security.capability before every write (slow small
                     writes); by default gfspy negotiates
                     FUSE_HANDLE_KILLPRIV_V2 and clears them itself
  debug              log every step (on stderr with -f, else to syslog), and
                     with -f libfuse's trace of every request

Without -f the command returns once the filesystem is ready, leaving a daemon
that serves it. umount, fusermount3 -u, SIGTERM and SIGINT unmount cleanly;
the daemon finishes that after umount(8) returns, except with umount.gfspy, which
waits for it. SIGUSR1 dumps the daemon's stacks to its stderr.

To let mount(8) use it (mount -t gfspy DEVICE DIR), link it as /sbin/mount.gfspy,
and umount.gfspy as /sbin/umount.fuse.gfspy so that umount waits too.

exit status:
  0   mounted (with -f: served and unmounted cleanly)
  1   bad usage: unknown option, missing argument
  2   with -f: the filesystem withdrew or could not be unmounted cleanly
  32  mount failure: the device cannot be opened or holds no usable GFS2
      filesystem, or the mount point is unusable

examples:
  mount.gfspy /srv/gfs2.img /mnt/gfs2
  mount.gfspy -o lockproto=lock_nolock,commit=5 nbd://storage1:10809/lun0 /mnt/gfs2
  mount -t gfspy -o noatime /srv/gfs2.img /mnt/gfs2
"""


class _Parser(argparse.ArgumentParser):
    """argparse that fails with one line and mount(8)'s usage code."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: {message}\n")


class MountError(Exception):
    """The mount could not be made; the message is for the user."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description=(
            "Mount the GFS2 filesystem on DEVICE (an image file, a block device or an "
            "nbd:// URI) at MOUNTPOINT through FUSE, replaying its journal first if "
            "it is dirty."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("device", metavar="DEVICE", help="image file, block device or nbd:// URI")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing directory")
    parser.add_argument(
        "-o", dest="options", action="append", default=[], metavar="OPTIONS",
        help="comma-separated mount options (see below); may be repeated",
    )  # fmt: skip
    parser.add_argument(
        "-f", "--foreground", action="store_true",
        help="stay in the foreground and log to stderr",
    )  # fmt: skip
    # Flags mount(8) passes to every helper; they mean nothing here.
    parser.add_argument("-s", "-n", "-v", dest="ignored", action="count", help=argparse.SUPPRESS)
    parser.add_argument("-t", dest="fstype", help=argparse.SUPPRESS)
    parser.add_argument("-N", dest="namespace", help=argparse.SUPPRESS)
    return parser


def _fuse_options(device: str, opts: MountOptions) -> set[str]:
    fuse_opts = set(pyfuse3.default_options)  # default_permissions
    # libfuse splits options at commas (multipath specs have them) unless escaped.
    fsname = device.replace("\\", "\\\\").replace(",", "\\,")
    fuse_opts |= {f"fsname={fsname}", "subtype=gfspy"}
    if opts.allow_other:
        fuse_opts.add("allow_other")
    if opts.readonly:
        fuse_opts.add("ro")
    if opts.debug:
        fuse_opts.add("debug")
    fuse_opts.update(opts.vfs_flags)
    return fuse_opts


def _raise_readahead(mountpoint: str) -> None:
    """Blocking (stats the mount): run in a thread once INIT is done, because the
    kernel resets the bdi's readahead during INIT."""
    try:
        st = os.stat(mountpoint)
        path = f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb"
        with open(path, "w") as f:
            f.write(str(READ_AHEAD_KB))
    except OSError as e:
        log.warning("%s: cannot raise readahead to %d KiB: %s", mountpoint, READ_AHEAD_KB, e)


def _syncfs(mountpoint: str) -> None:
    """Blocking: push the kernel's dirty pages to us while we still serve them."""
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        log.warning("syncfs(%s): %s", mountpoint, e)
        return
    try:
        if libc.syncfs(fd) != 0:
            log.warning("syncfs(%s): %s", mountpoint, os.strerror(ctypes.get_errno()))
    finally:
        os.close(fd)


async def _unmount_on_signal(mountpoint: str) -> None:
    """SIGTERM/SIGINT: unmount the way umount would, so the kernel writes back first."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("%s: %s received, unmounting", mountpoint, signal.Signals(signum).name)
            await trio.to_thread.run_sync(_syncfs, mountpoint)
            result = await trio.run_process(
                ["fusermount3", "-u", mountpoint], check=False, capture_stderr=True
            )
            if result.returncode != 0:
                log.warning(
                    "%s: fusermount3 -u failed (%s); stopping the FUSE loop instead",
                    mountpoint,
                    result.stderr.decode(errors="replace").strip(),
                )
                pyfuse3.terminate()
                return


async def _report_when_ready(
    ops: GfspyOperations, mountpoint: str, pipe: ReadyPipe, record: DaemonRecord
) -> None:
    await ops.initialized.wait()
    await trio.to_thread.run_sync(_raise_readahead, mountpoint)
    await trio.to_thread.run_sync(record.register_with_umount8)
    killpriv.report(mountpoint)
    log.info("%s: ready", mountpoint)
    pipe.ready()


async def _open_filesystem(device_spec: str, opts: MountOptions) -> FileSystem:
    try:
        device = await open_device(device_spec, readonly=opts.readonly)
    except OSError as e:
        raise MountError(f"{device_spec}: cannot open: {e.strerror or e}") from None
    try:
        return await FileSystem.open(
            device,
            jid=opts.jid,
            readonly=opts.readonly,
            lockproto=opts.lockproto,
            commit_interval=opts.commit_interval,
        )
    except FsError as e:
        await device.aclose()
        raise MountError(f"{device_spec}: {e.strerror or e}") from None
    except Exception as e:
        await device.aclose()
        log.debug("mount failed", exc_info=True)
        raise MountError(f"{device_spec}: cannot mount: {type(e).__name__}: {e}") from None


async def serve(device_spec: str, mountpoint: str, opts: MountOptions, pipe: ReadyPipe) -> int:
    """Mount, serve until unmounted, close. Returns the exit code."""
    fs = await _open_filesystem(device_spec, opts)
    ops = GfspyOperations(fs)
    if opts.killpriv:
        killpriv.enable()
    # For umount.gfspy: which daemon serves this mount, and later how it ended.
    record = DaemonRecord(device_spec, mountpoint)
    try:
        pyfuse3.init(ops, mountpoint, _fuse_options(device_spec, opts))
    except RuntimeError:
        await fs.close()
        await fs.device.aclose()
        raise MountError(f"{mountpoint}: cannot mount FUSE there") from None
    await trio.to_thread.run_sync(record.write_serving)
    code = EXIT_OK
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ops.run_invalidations)
            nursery.start_soon(fs.run_periodic_flush)
            nursery.start_soon(_unmount_on_signal, mountpoint)
            nursery.start_soon(_report_when_ready, ops, mountpoint, pipe, record)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    except Exception:
        code = EXIT_SERVE_FAILED
        log.exception("%s: FUSE loop failed", mountpoint)
    finally:
        with trio.CancelScope(shield=True):
            try:
                await fs.close()
            except Exception:  # noqa: BLE001 - report, then still release the mount
                log.exception("%s: clean unmount failed", mountpoint)
                code = EXIT_SERVE_FAILED
            if fs.withdrawn:
                code = EXIT_SERVE_FAILED
            pyfuse3.close(unmount=True)  # a no-op if umount already did it
            await fs.device.aclose()
            await trio.to_thread.run_sync(record.write_outcome, code)
    probes = killpriv.capability_probes()
    if probes is not None:
        log.info("%s: the kernel asked for security.capability %d times", mountpoint, probes)
    log.info("%s: unmounted (exit %d)", mountpoint, code)
    return code


def _setup_logging(opts: MountOptions, foreground: bool) -> None:
    level = logging.DEBUG if opts.debug else logging.INFO
    if foreground:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(address="/dev/log")
    else:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter(f"{PROG}[%(process)d] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _run(
    device: str, mountpoint: str, opts: MountOptions, foreground: bool, pipe: ReadyPipe
) -> int:
    _setup_logging(opts, foreground)
    faulthandler.register(signal.SIGUSR1)
    # The daemon keeps many long-lived objects (cached inodes, dirent indexes), and
    # the default young-generation threshold of 700 made the collector a
    # measurable share of every create; collections stay automatic, just rarer.
    gc.set_threshold(20_000, 50, 1000)
    try:
        return trio.run(serve, device, mountpoint, opts, pipe)
    except MountError as e:
        pipe.error(str(e))
        if foreground:
            print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_MOUNT_FAILED
    except Exception as e:  # noqa: BLE001 - one line for the user, the traceback in the log
        log.exception("unexpected failure")
        pipe.error(f"unexpected failure: {type(e).__name__}: {e}")
        if foreground:
            print(f"{PROG}: unexpected failure: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_MOUNT_FAILED


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        opts = parse_options(args.options)
    except OptionError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_USAGE
    mountpoint = os.path.abspath(args.mountpoint)
    device = args.device
    if "://" not in device and "," not in device:
        device = os.path.abspath(device)  # the daemon leaves the current directory
    if not os.path.isdir(mountpoint):
        why = os.strerror(errno.ENOTDIR if os.path.exists(mountpoint) else errno.ENOENT)
        print(f"{PROG}: {args.mountpoint}: {why}", file=sys.stderr)
        return EXIT_MOUNT_FAILED
    if args.foreground:
        return _run(device, mountpoint, opts, True, ReadyPipe(None))
    return run_detached(lambda pipe: _run(device, mountpoint, opts, False, pipe), PROG)
