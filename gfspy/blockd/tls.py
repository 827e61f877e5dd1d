"""TLS for gfspy-blockd: contexts that insist on CA-signed certificates on both ends.

The certificate's CN is the peer's authenticated identity: the node name on the NBD
port, and an administrator name on the control port (so a fenced node, whose
certificate is a node's, cannot unfence itself).
"""

from __future__ import annotations

import ssl


def server_context(cert_file: str, key_file: str, ca_file: str) -> ssl.SSLContext:
    """Build the context; raises OSError/ssl.SSLError on unreadable or mismatched files."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    context.load_verify_locations(cafile=ca_file)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(cert_file: str, key_file: str, ca_file: str) -> ssl.SSLContext:
    """For control-channel clients: present our certificate, verify the server's."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


def common_name(cert: dict | None) -> str | None:
    """The subject CN of a certificate as returned by getpeercert()."""
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None
