"""`python -m gfspy.fuse` is mount.gfspy."""

import sys

from gfspy.fuse.mount import main

sys.exit(main())
