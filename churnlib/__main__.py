"""`python -m churnlib`: the same as the `churn` command."""

from churnlib.cli import run

run()
