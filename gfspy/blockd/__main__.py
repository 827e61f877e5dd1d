"""`python -m gfspy.blockd`: run the storage server."""

import sys

from gfspy.blockd.cli import main

sys.exit(main())
