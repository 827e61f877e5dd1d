"""The filesystem logic of mount.gfspy: inodes, directories, allocation, xattrs.

The public names and their contract live in `gfspy.fs.api`.
"""

from gfspy.fs.api import *  # noqa: F403
from gfspy.fs.api import __all__  # noqa: F401
