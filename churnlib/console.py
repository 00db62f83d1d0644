"""Output for a person: stderr, flushed (stdout stays for results and --json)."""

from __future__ import annotations

import sys


def say(message: str) -> None:
    """Print a line for people: stderr, flushed (stdout is kept for ``--json``)."""
    print(message, file=sys.stderr, flush=True)
