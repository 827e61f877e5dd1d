"""HOST:PORT parsing shared by gfspy-blockd, its control client and the admin tool."""

from __future__ import annotations


def parse_hostport(text: str, default_port: int | None = None) -> tuple[str, int]:
    """Split ``HOST:PORT``, ``[V6]:PORT`` or (with a default port) a bare host.

    Raises ValueError with a message fit for a one-line error.
    """
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: unterminated '[' in address")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"{text!r}: expected ':' after ']'")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if not port_text:
        if default_port is None:
            raise ValueError(f"{text!r}: expected HOST:PORT")
        return host or "0.0.0.0", default_port
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{text!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{text!r}: port {port} out of range")
    return host or "0.0.0.0", port
