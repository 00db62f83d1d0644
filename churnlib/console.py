"""Output for a person: stderr, flushed (stdout stays for results and --json)."""

from __future__ import annotations

import sys


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
