"""A randomized data check in the style of fsx: thousands of writes, truncates, holes
and mmap writes on one file through the mount, every read checked against a model.

Sizes cross from stuffed (< one block) to height 1 and height 2 (past ~1.9 MiB with
4 KiB blocks). The kernel's page cache would answer most reads itself, so the file
is fsync'd and its cache dropped (POSIX_FADV_DONTNEED) every few dozen operations:
the reads that follow come from gfspy. A remount at the end checks what reached the
disk.
"""

from __future__ import annotations

import mmap
import os
import random
from pathlib import Path

import pytest

from .helpers import assert_clean

OPS = 10000
MAX_SIZE = 5 << 20  # beyond height 1 (483 pointers x 4 KiB) into height 2


def check_range(fd: int, model: bytearray, offset: int, length: int, what: str) -> None:
    got = os.pread(fd, length, offset)
    want = bytes(model[offset : offset + length])
    if got != want:
        first = next(
            (i for i in range(min(len(got), len(want))) if got[i] != want[i]),
            min(len(got), len(want)),
        )
        raise AssertionError(
            f"{what}: read {length} at {offset}: first difference at {offset + first} "
            f"(got {len(got)} bytes, want {len(want)})"
        )


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_random_operations_match_the_model(tmp_path: Path, mount_image) -> None:
    rng = random.Random(1802)
    m = mount_image()
    path = m.mountpoint / "fsx.dat"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    model = bytearray()
    log: list[str] = []
    try:
        for step in range(OPS):
            op = rng.random()
            # Favour small sizes early and large ones later, so every height is crossed
            # in both directions.
            limit = rng.choice((3000, 4096 * 8, 1 << 20, MAX_SIZE))
            if op < 0.40:  # write, maybe past EOF (leaving a hole)
                offset = rng.randrange(limit)
                data = rng.randbytes(rng.randrange(1, 65536))
                os.pwrite(fd, data, offset)
                if offset > len(model):
                    model.extend(bytes(offset - len(model)))
                model[offset : offset + len(data)] = data
                log.append(f"{step} write {offset}+{len(data)}")
            elif op < 0.55:  # truncate up or down
                size = rng.randrange(limit)
                os.ftruncate(fd, size)
                if size < len(model):
                    del model[size:]
                else:
                    model.extend(bytes(size - len(model)))
                log.append(f"{step} truncate {size}")
            elif op < 0.65 and len(model) > 0:  # mmap write inside the file
                offset = rng.randrange(len(model))
                length = min(rng.randrange(1, 20000), len(model) - offset)
                data = rng.randbytes(length)
                with mmap.mmap(fd, len(model)) as mm:
                    mm[offset : offset + length] = data
                    mm.flush()
                model[offset : offset + length] = data
                log.append(f"{step} mmap write {offset}+{length}")
            elif op < 0.95:  # read somewhere, possibly across EOF
                offset = rng.randrange(max(1, len(model) + 4096))
                check_range(fd, model, offset, rng.randrange(1, 100000), f"step {step}")
            else:  # durability point: the next reads come from the daemon
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                log.append(f"{step} fsync+drop")
            assert os.fstat(fd).st_size == len(model), f"step {step}: size; last {log[-3:]}"
            if step % 500 == 0:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                check_range(fd, model, 0, len(model) + 1, f"full check at {step}")
    finally:
        os.close(fd)
    assert m.unmount() == 0, m.log()
    assert_clean(m.image)
    again = mount_image(m.image)
    assert (again.mountpoint / "fsx.dat").read_bytes() == bytes(model)
    assert again.unmount() == 0
