"""Real mounts for the FUSE tests: images from gfspy-mkfs and mkfs.gfs2, mount.gfspy as
a subprocess, strict teardown, and the two checkers (fsck.gfs2 and gfspy-fsck)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MOUNT_CMD = [sys.executable, "-m", "gfspy.fuse"]

# What fsck.gfs2 prints on a healthy image; any other line is a complaint.
_FSCK_PROGRESS = re.compile(
    r"^(Initializing fsck|Validating resource group index\.|Level 1 resource group check"
    r".*|\(level 1 passed\)|Starting (pass\S+|check_statfs)|Reconciling bitmaps\.|"
    r"\S+ completed in [0-9.]+s|fsck\.gfs2 complete|\d+ percent complete\.)$"
)


def make_image(
    path: Path, *, tool: str = "gfspy", size_mib: int = 512, lockproto: str = "lock_nolock"
) -> Path:
    """A fresh image made by gfspy's mkfs or by the real mkfs.gfs2."""
    with open(path, "wb") as f:
        f.truncate(size_mib << 20)
    if tool == "gfspy":
        cmd = [sys.executable, "-m", "gfspy.mkfs", "-q", "-O", "-p", lockproto]
    else:
        cmd = ["mkfs.gfs2", "-q", "-O", "-p", lockproto]
    if lockproto == "lock_dlm":
        cmd += ["-t", "testclu:fuse"]
    subprocess.run([*cmd, str(path)], check=True, capture_output=True, cwd=REPO, timeout=60)
    return path


def fsck_gfs2(image: Path) -> tuple[int, list[str]]:
    """fsck.gfs2 -n: its exit status and every line that is not progress chatter."""
    proc = subprocess.run(
        ["fsck.gfs2", "-n", str(image)], capture_output=True, text=True, timeout=120
    )
    complaints = [
        line
        for line in (proc.stdout + proc.stderr).splitlines()
        if line.strip() and not _FSCK_PROGRESS.match(line.strip())
    ]
    return proc.returncode, complaints


def gfspy_fsck(image: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gfspy.fsck", "-n", str(image)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=180,
    )


def assert_clean(image: Path) -> None:
    """Both checkers agree the unmounted image is consistent."""
    rc, complaints = fsck_gfs2(image)
    assert rc == 0 and not complaints, f"fsck.gfs2 -n exit {rc}: {complaints[:30]}"
    ours = gfspy_fsck(image)
    assert ours.returncode == 0, f"gfspy-fsck -n exit {ours.returncode}: {ours.stdout[-3000:]}"


def fusermount_u(mountpoint: Path, *, lazy: bool = False) -> bool:
    cmd = (
        ["fusermount3", "-u", "-z", str(mountpoint)]
        if lazy
        else ["fusermount3", "-u", str(mountpoint)]
    )
    return subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0


def abort_fuse_connection(dev: int) -> None:
    """Abort a FUSE connection through fusectl, as an administrator would after the
    daemon died: without it a process waiting on writeback to the dead daemon can
    stay in D state for good (seen on kernel 6.18). fusectl is mounted in a private
    mount namespace so the machine's mount table is left alone."""
    path = f"/sys/fs/fuse/connections/{os.minor(dev)}/abort"
    script = f"mount -t fusectl none /sys/fs/fuse/connections && test -e {path} && echo 1 > {path}"
    subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, timeout=30)


def reap_after_crash(proc: subprocess.Popen[bytes], dev: int | None, timeout: float = 60) -> None:
    """Kill and reap a process that used a mount whose daemon died. A writer caught
    in writeback can stay in D state even after the first abort (seen on 6.18 under
    load), so the connection is aborted again until the process is gone."""
    proc.kill()
    deadline = time.monotonic() + timeout
    while True:
        try:
            proc.wait(timeout=2)
            return
        except subprocess.TimeoutExpired:
            if time.monotonic() > deadline:
                raise
            if dev is not None:
                abort_fuse_connection(dev)


class Mount:
    """mount.gfspy -f as a subprocess, with its log in a file beside the image."""

    def __init__(
        self, image: Path | str, mountpoint: Path, options: str = "", log: Path | None = None
    ):
        self.image = image
        self.mountpoint = mountpoint
        self.options = options
        self.log_path = log or mountpoint.with_name(mountpoint.name + ".log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.dev: int | None = None

    def start(self, *, extra_cmd: list[str] | None = None, timeout: float = 30) -> Mount:
        self.mountpoint.mkdir(exist_ok=True)
        cmd = [*(extra_cmd or MOUNT_CMD), str(self.image), str(self.mountpoint), "-f"]
        if self.options:
            cmd += ["-o", self.options]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=REPO)
        deadline = time.monotonic() + timeout
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"mount.gfspy exited {self.proc.returncode} before mounting:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"mount not ready after {timeout}s:\n{self.log()}")
            time.sleep(0.02)
        self.dev = os.stat(self.mountpoint).st_dev
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def unmount(self, timeout: float = 60) -> int:
        """Clean unmount; returns the daemon's exit status."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while not fusermount_u(self.mountpoint):
            if time.monotonic() > deadline:
                raise AssertionError(f"fusermount3 -u kept failing:\n{self.log()}")
            time.sleep(0.2)
        code = self.proc.wait(timeout=timeout)
        self.proc = None
        return code

    def kill(self) -> None:
        """SIGKILL the daemon: a crash. The dead mount is then detached lazily."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None
        if self.dev is not None:
            abort_fuse_connection(self.dev)
        fusermount_u(self.mountpoint, lazy=True)

    def cleanup(self) -> None:
        """Teardown that never leaves a mount or a process behind."""
        if self.proc is not None and self.proc.poll() is not None and self.dev is not None:
            abort_fuse_connection(self.dev)  # the daemon died: nothing will answer
        if os.path.ismount(self.mountpoint) and not fusermount_u(self.mountpoint):
            fusermount_u(self.mountpoint, lazy=True)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
