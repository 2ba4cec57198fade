"""`python -m supervisor ...`: the same CLI as the `supervisor` command (handy in a notebook cell)."""

import sys

from supervisor.cli import main

sys.exit(main())
