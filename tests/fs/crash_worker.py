"""Workload for the SIGKILL test: mounts an image with FileSystem and churns until it
is killed. After each fsync it prints "synced NAME SIZE SEED" so the test knows
what must survive. Run as `python -m tests.fs.crash_worker IMAGE`."""

from __future__ import annotations

import random
import sys

import trio

from gfspy.blockdev.local import LocalDevice
from gfspy.fs.api import FileSystem, SetAttr


def payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


async def main(path: str) -> None:
    device = await LocalDevice.open(path)
    fs = await FileSystem.open(device, commit_interval=0.05)
    root = fs.root_ino
    rng = random.Random()
    n = 0
    while True:
        n += 1
        d = (await fs.mkdir(root, b"dir%d" % n, 0o755, 0, 0)).ino
        for i in range(rng.randrange(5, 40)):
            attr = await fs.create(d, b"f%d" % i, 0o100644, 0, 0)
            await fs.write(attr.ino, 0, rng.randbytes(rng.choice([10, 3000, 9000, 200_000])))
            if i % 3 == 0:
                await fs.setxattr(attr.ino, b"user.i", b"%d" % i, 0)
            if i % 4 == 0:
                await fs.rename(d, b"f%d" % i, root, b"r%d-%d" % (n, i))
            elif i % 5 == 0:
                await fs.unlink(d, b"f%d" % i)
            elif i % 7 == 0:
                await fs.setattr(attr.ino, SetAttr(size=rng.randrange(100_000)))
        seed = rng.randrange(1 << 30)
        size = rng.choice([100, 5000, 300_000])
        name = b"synced%d" % n
        attr = await fs.create(root, name, 0o100644, 0, 0)
        await fs.write(attr.ino, 0, payload(seed, size))
        await fs.fsync(attr.ino, False)
        print(f"synced {name.decode()} {size} {seed}", flush=True)


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
