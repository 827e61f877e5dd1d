"""gfspy: a shared-disk cluster filesystem in user space, byte-compatible with GFS2."""

__version__ = "0.1.0"
