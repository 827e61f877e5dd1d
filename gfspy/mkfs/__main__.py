"""`python -m gfspy.mkfs`: the same as the gfspy-mkfs command."""

import sys

from gfspy.mkfs.cli import main

sys.exit(main())
