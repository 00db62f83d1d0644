"""`python -m churnlib`: the same as the `churn` command."""

import sys

from churnlib.cli import main

sys.exit(main())
