"""`python -m mreaper`: the `mreaper` command, for when no console script is on PATH."""

import sys

from mreaper.cli import main

sys.exit(main())
