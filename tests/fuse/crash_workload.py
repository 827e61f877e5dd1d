"""A metadata-heavy workload for the crash tests, run as its own process.

Usage: crash_workload.py MOUNTPOINT DURABLE_LOG SEED

It churns the namespace under churn/ (creates, renames over, hard links, unlinks,
mkdir/rmdir, xattrs, truncates) and now and then writes a file under keep/, fsyncs
it and its directory, and only then appends "name sha256" to DURABLE_LOG (outside
the mount, fsync'd too). Files under keep/ are never touched again, so every name in
the log must survive a crash with exactly that content. It runs until killed or
until the mount goes away.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import sys
from pathlib import Path


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main() -> int:
    root, log_path, seed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    churn, keep = root / "churn", root / "keep"
    churn.mkdir(exist_ok=True)
    keep.mkdir(exist_ok=True)
    log = open(log_path, "a")  # noqa: SIM115 - held for the life of the process
    step = 0
    try:
        while True:
            step += 1
            name = churn / f"f{rng.randrange(300)}"
            op = rng.randrange(10)
            try:
                if op < 3:
                    name.write_bytes(rng.randbytes(rng.choice((0, 100, 5000, 70000))))
                elif op == 3:
                    os.rename(name, churn / f"f{rng.randrange(300)}")
                elif op == 4:
                    os.link(name, churn / f"l{step}")
                elif op == 5:
                    os.unlink(name)
                elif op == 6:
                    sub = churn / f"d{rng.randrange(30)}"
                    os.mkdir(sub)
                    (sub / "x").write_bytes(b"x")
                    if rng.random() < 0.5:
                        os.unlink(sub / "x")
                        os.rmdir(sub)
                elif op == 7:
                    os.setxattr(
                        name, f"user.a{rng.randrange(5)}", rng.randbytes(rng.randrange(3000))
                    )
                elif op == 8:
                    os.truncate(name, rng.randrange(200000))
                else:
                    data = rng.randbytes(rng.choice((10, 4096, 100000)))
                    target = keep / f"k{seed}-{step}"
                    with open(target, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                    fsync_path(keep)
                    log.write(f"{target.name} {hashlib.sha256(data).hexdigest()}\n")
                    log.flush()
                    os.fsync(log.fileno())
            except OSError as e:
                if e.errno in (errno.ENOTCONN, errno.EIO, errno.ECONNABORTED):  # the daemon is gone
                    return 0
    finally:
        log.close()


if __name__ == "__main__":
    sys.exit(main())
