"""The NBD protocol: wire format and sans-IO state machines (no sockets here)."""
