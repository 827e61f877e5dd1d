"""STARTTLS with X.509 client certificates: the certificate CN is the node identity."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import make_image


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def issue(cwd: Path, name: str, cn: str, ext: str | None = None) -> None:
    """Key and CA-signed certificate `<name>-cert.pem` for CN `cn`."""
    openssl(
        "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}-key.pem", cwd=cwd
    )
    openssl(
        "req",
        "-new",
        "-key",
        f"{name}-key.pem",
        "-subj",
        f"/CN={cn}",
        "-out",
        f"{name}.csr",
        cwd=cwd,
    )
    extra = []
    if ext:
        (cwd / f"{name}.ext").write_text(ext + "\n")
        extra = ["-extfile", f"{name}.ext"]
    openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
        "-CAcreateserial", "-days", "2", "-out", f"{name}-cert.pem", *extra, cwd=cwd,
    )  # fmt: skip


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1, and libnbd-style client directories."""
    d = tmp_path / "pki"
    d.mkdir()
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca-key.pem", cwd=d)
    openssl(
        "req", "-x509", "-new", "-key", "ca-key.pem", "-subj", "/CN=gfspy test CA",
        "-days", "2", "-out", "ca-cert.pem", cwd=d,
    )  # fmt: skip
    issue(d, "server", "127.0.0.1", "subjectAltName=IP:127.0.0.1")
    issue(d, "client", "node3")
    issue(d, "admin", "admin")
    good = d / "node3"
    good.mkdir()
    for src, dst in (
        ("ca-cert", "ca-cert"),
        ("client-cert", "client-cert"),
        ("client-key", "client-key"),
    ):
        (good / f"{dst}.pem").write_bytes((d / f"{src}.pem").read_bytes())
    nocert = d / "nocert"
    nocert.mkdir()
    (nocert / "ca-cert.pem").write_bytes((d / "ca-cert.pem").read_bytes())
    return d


def nbdinfo(uri: str) -> subprocess.CompletedProcess:
    return subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=60)


@pytest.mark.timeout(120)
def test_tls_client_certificate_required_and_names_the_node(start_blockd, pki, tmp_path):
    server = start_blockd(
        {"disk": make_image(tmp_path / "disk.img", 1 << 20)},
        "--tls-cert", str(pki / "server-cert.pem"),
        "--tls-key", str(pki / "server-key.pem"),
        "--tls-ca", str(pki / "ca-cert.pem"),
    )  # fmt: skip
    base = f"nbds://127.0.0.1:{server.nbd_port}"
    good = nbdinfo(f"{base}/disk?tls-certificates={pki / 'node3'}")
    assert good.returncode == 0, good.stderr
    assert good.stdout.strip() == str(1 << 20)
    assert "certificate CN node3" in server.log_text()
    qemu = subprocess.run(
        ["qemu-img", "info", "--output=json",
         "--object", f"tls-creds-x509,id=tls0,dir={pki / 'node3'},endpoint=client",
         "--image-opts",
         f"driver=nbd,host=127.0.0.1,port={server.nbd_port},export=disk,tls-creds=tls0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert qemu.returncode == 0, qemu.stderr
    assert '"virtual-size": 1048576' in qemu.stdout

    # No client certificate: the TLS handshake is refused.
    assert nbdinfo(f"{base}/disk?tls-certificates={pki / 'nocert'}").returncode != 0
    # Plain NBD is refused too (FORCEDTLS), not silently served.
    plain = nbdinfo(f"nbd://127.0.0.1:{server.nbd_port}/disk")
    assert plain.returncode != 0
    # A declared identity must match the certificate.
    other = nbdinfo(f"{base}/disk@node9:1?tls-certificates={pki / 'node3'}")
    assert other.returncode != 0
    assert "policy" in other.stderr
    assert "declared node node9 but certificate says node3" in server.log_text()
    assert server.alive()

    # The control channel wants TLS with an administrator's certificate: not none, and
    # not a node's (a fenced node must not be able to unfence itself).
    def fence(*tls: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "gfspy.admin.cli", "fence", "node3", "--server", server.control,
             "--timeout", "20", *tls],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    ca = ["--tls-ca", str(pki / "ca-cert.pem")]
    assert fence().returncode == 1
    as_node = fence(
        "--tls-cert", str(pki / "client-cert.pem"), "--tls-key", str(pki / "client-key.pem"), *ca
    )
    assert as_node.returncode == 1, as_node.stdout
    assert "certificate CN node3 is not an administrator" in server.log_text()
    # The CN is what a fence names: after fencing node3 its certificate no longer works.
    as_admin = fence(
        "--tls-cert", str(pki / "admin-cert.pem"), "--tls-key", str(pki / "admin-key.pem"), *ca
    )
    assert as_admin.returncode == 0, as_admin.stdout + as_admin.stderr
    assert "CONFIRMED" in as_admin.stdout
    refused = nbdinfo(f"{base}/disk?tls-certificates={pki / 'node3'}")
    assert refused.returncode != 0
    assert "policy" in refused.stderr
    assert "refused, node node3 is fenced" in server.log_text()
