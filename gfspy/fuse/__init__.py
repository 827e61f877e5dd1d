"""The pyfuse3 adapter and mount.gfspy: kernel requests in, gfspy.fs calls out."""

# First, before anything imports pyfuse3: the FUSE channel library must be loaded
# for pyfuse3 to bind to it (see killpriv).
from gfspy.fuse import killpriv

__all__ = ["killpriv"]
