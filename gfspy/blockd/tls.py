"""TLS for gfspy-blockd: a server context that insists on a CA-signed client certificate.

The certificate's CN is the node's authenticated identity, which is what makes fencing
by node name meaningful; so a client without a valid certificate never gets in.
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
