"""nbds://: STARTTLS with an X.509 client certificate whose CN is the node name."""

from __future__ import annotations

import errno
import signal
import ssl
import subprocess
from pathlib import Path

import pytest
import trio

from gfspy.blockd.control_client import server_status
from gfspy.blockdev.device import DeviceError, open_device
from gfspy.blockdev.multipath import MultipathDevice
from gfspy.blockdev.nbd import NbdDevice

from .servers import Blockd, make_image


def openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def issue(d: Path, name: str, cn: str, san: str | None = None) -> None:
    openssl(d, "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}-key.pem")
    openssl(
        d, "req", "-new", "-key", f"{name}-key.pem", "-subj", f"/CN={cn}", "-out", f"{name}.csr"
    )
    extra = []
    if san:
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        extra = ["-extfile", f"{name}.ext"]
    openssl(
        d, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
        "-CAcreateserial", "-days", "2", "-out", f"{name}-cert.pem", *extra,
    )  # fmt: skip


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1, and libnbd-style client directories."""
    d = tmp_path / "pki"
    d.mkdir()
    openssl(d, "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca-key.pem")
    openssl(d, "req", "-x509", "-new", "-key", "ca-key.pem", "-subj", "/CN=test CA", "-days", "2", "-out", "ca-cert.pem")  # fmt: skip
    issue(d, "server", "127.0.0.1", "IP:127.0.0.1")
    issue(d, "client", "node3")
    issue(d, "admin", "admin")
    for name, files in {
        "node3": ("ca-cert", "client-cert", "client-key"),
        "nocert": ("ca-cert",),
    }.items():
        (d / name).mkdir()
        for f in files:
            (d / name / f"{f}.pem").write_bytes((d / f"{f}.pem").read_bytes())
    return d


def admin_context(pki: Path) -> ssl.SSLContext:
    """What an administrator (the test) presents on the TLS control channel."""
    context = ssl.create_default_context(cafile=str(pki / "ca-cert.pem"))
    context.load_cert_chain(str(pki / "admin-cert.pem"), str(pki / "admin-key.pem"))
    return context


@pytest.mark.timeout(90)
async def test_tls_paths_carry_the_certificate_identity(tmp_path, pki):
    image = make_image(tmp_path / "lun.img", 4 << 20)
    # gfspy-blockd lets only administrator certificates onto its control channel, and the
    # client's quiesce rule needs SESSION_FENCE of its own sessions: node3 is listed as an
    # administrator here until the server accepts that one operation from the node itself.
    tls = ["--tls-cert", str(pki / "server-cert.pem"), "--tls-key", str(pki / "server-key.pem"),
           "--tls-ca", str(pki / "ca-cert.pem"), "--admin-cn", "admin", "--admin-cn", "node3"]  # fmt: skip
    a = Blockd(image, tmp_path / "a", extra_args=tls).start()
    b = Blockd(image, tmp_path / "b", extra_args=tls).start()
    try:
        certs = f"&tls-certificates={pki / 'node3'}"
        uris = [s.uri("node3", scheme="nbds", query=certs) for s in (a, b)]
        dev = await open_device(",".join(uris))
        try:
            assert isinstance(dev, MultipathDevice)
            await dev.write(0, b"t" * 4096)
            await dev.flush()
            assert await dev.read(0, 4096) == b"t" * 4096
            status = await server_status(a.control, timeout=10, ssl_context=admin_context(pki))
            (session,) = status["sessions"]
            assert session["node"] == "node3" and session["authenticated"]
        finally:
            await dev.aclose()
        assert "certificate CN node3" in a.log_text()

        # No client certificate, or plain NBD to a TLS-only server: one clean error each.
        with pytest.raises(DeviceError) as e:
            await NbdDevice.open(
                a.uri(None, scheme="nbds", query=f"&tls-certificates={pki / 'nocert'}")
            )
        assert e.value.errno in (errno.EACCES, errno.ECONNRESET)
        with pytest.raises(DeviceError) as e:
            await NbdDevice.open(a.uri(None))
        assert e.value.errno == errno.EACCES
        with pytest.raises(DeviceError) as e:
            await NbdDevice.open(
                a.uri(None, scheme="nbds", query=f"&tls-certificates={tmp_path}/none")
            )
        assert e.value.errno == errno.ENOENT
    finally:
        a.stop()
        b.stop()
    assert image.read_bytes()[:4096] == b"t" * 4096


@pytest.mark.timeout(90)
async def test_tls_in_doubt_write_is_settled_over_the_tls_control_channel(tmp_path, pki, caplog):
    image = make_image(tmp_path / "lun.img", 1 << 20)
    tls = ["--tls-cert", str(pki / "server-cert.pem"), "--tls-key", str(pki / "server-key.pem"),
           "--tls-ca", str(pki / "ca-cert.pem"), "--admin-cn", "node3"]  # fmt: skip
    server = Blockd(image, tmp_path / "s", extra_args=tls).start()
    try:
        uri = server.uri("node3", scheme="nbds", query=f"&tls-certificates={pki / 'node3'}")
        dev = await NbdDevice.open(uri, io_timeout=1, quiesce_timeout=30)
        try:
            server.proc.send_signal(signal.SIGSTOP)  # frozen: the write below is in doubt
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(dev.write, 0, b"s" * 4096)
                    await trio.sleep(2.0)
                    server.proc.send_signal(signal.SIGCONT)
            finally:
                server.proc.send_signal(signal.SIGCONT)
            assert "SESSION_FENCE" in caplog.text and "confirmed" in caplog.text
            assert await dev.read(0, 4096) == b"s" * 4096
        finally:
            await dev.aclose()
    finally:
        server.stop()
