"""`python -m gfspy.fsck`: the same as the gfspy-fsck command."""

import sys

from gfspy.fsck.cli import main

sys.exit(main())
