"""`python -m bonehpc` = the bonehpc console script."""

import sys

from bonehpc.cli import main

sys.exit(main())
