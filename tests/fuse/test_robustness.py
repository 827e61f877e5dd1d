"""No failure inside the fs layer may kill the mount: handlers turn every exception
into an errno, and the mount keeps serving."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest

from .helpers import Mount, assert_clean, make_image

FAULTY = [sys.executable, str(Path(__file__).with_name("faulty_mount.py"))]


@pytest.mark.timeout(120)
def test_unexpected_exceptions_become_eio_and_the_mount_survives(
    tmp_path: Path, mounts: list[Mount]
) -> None:
    m = Mount(make_image(tmp_path / "img", size_mib=256), tmp_path / "mnt")
    mounts.append(m)
    m.start(extra_cmd=FAULTY)
    root = m.mountpoint
    (root / "f").write_bytes(b"before")
    with open(root / "sparse", "wb") as f:
        f.seek(2 << 30)
        f.write(b"x")
    for attempt in range(3):
        with pytest.raises(OSError) as info:
            os.stat(root / "boom")
        assert info.value.errno == errno.EIO
        with pytest.raises(OSError) as info:
            os.getxattr(root / "f", "user.boom")
        assert info.value.errno == errno.EIO
        fd = os.open(root / "sparse", os.O_RDONLY | os.O_DIRECT)
        try:
            with pytest.raises(OSError) as info:
                os.pread(fd, 4096, (1 << 30) + 4096 * attempt)
            assert info.value.errno == errno.EIO
        finally:
            os.close(fd)
        # Still mounted and fully usable after each failure.
        assert (root / "f").read_bytes() == b"before"
        (root / f"after{attempt}").write_bytes(b"still alive")
        assert {"f", "sparse", f"after{attempt}"} <= set(os.listdir(root))
    # Ordinary errors are not logged as bugs; the injected ones are, with tracebacks.
    for name in (b"missing", b"n" * 300):
        with pytest.raises(OSError):
            os.stat(root / os.fsdecode(name))
    assert m.unmount() == 0, m.log()
    log = m.log_path.read_text()
    assert log.count("injected bug in lookup") >= 3 and "Traceback" in log
    assert "missing" not in log
    assert_clean(m.image)
