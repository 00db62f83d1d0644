"""Errors a user can cause, each with the exit code the CLI returns for it.

The CLI prints ``error: <message>`` (one line) and exits with ``exit_code``;
nothing else in the library prints tracebacks for these.
"""

from __future__ import annotations

import re

# Turning someone else's exception into the one line a user reads: here and nowhere else.

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TELLING = ("refused", "denied", "does not exist", "NoSuchBucket", "InvalidAccessKeyId", "SignatureDoesNotMatch",
            "AccessDenied", "timeout", "timed out")


def strip_ansi(text: str) -> str:
    """``text`` without terminal colour codes (Ray colours some of its messages)."""
    return _ANSI.sub("", text)


def _lines(exc: BaseException) -> list[str]:
    text = strip_ansi(str(getattr(exc, "message", None) or exc))
    return [line.strip() for line in text.splitlines() if line.strip()]


def one_line(exc: BaseException, limit: int = 500) -> str:
    """An error as one line (whitespace collapsed, at most ``limit`` characters)."""
    text = " ".join(strip_ansi(str(exc)).split()) or type(exc).__name__
    return text[:limit]


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of a multi-line error (its type when it has no text); of an error whose text
    is a formatted traceback (Tune's ``TuneError`` carries one), the last, where Python puts the error."""
    lines = _lines(exc)
    if lines and lines[0].startswith("Traceback (most recent call last)"):
        return lines[-1][:limit]
    return (lines[0] if lines else type(exc).__name__)[:limit]


def last_line(exc: BaseException, limit: int = 300) -> str:
    """The last line of a multi-line error: where Python and Ray put the actual message."""
    lines = _lines(exc)
    return (lines[-1] if lines else "")[:limit]


def telling_line(exc: BaseException, limit: int = 300) -> str:
    """The most telling line of a (possibly wrapped) client error: the one that says refused, denied,
    missing or timed out, else the first (boto's and MLflow's "(Background on this error ...)" skipped)."""
    lines = [line for line in _lines(exc) if not line.startswith("(Background")]
    for line in lines:
        if any(word in line for word in _TELLING):
            return line[:limit]
    return (lines[0] if lines else type(exc).__name__)[:limit]


def root_cause(exc: BaseException, limit: int = 500) -> str:
    """``Type: message`` of the innermost cause (Ray wraps a worker's error in its own several times)."""
    seen = set()
    while True:
        nxt = getattr(exc, "cause", None) or exc.__cause__
        if nxt is None or id(nxt) in seen:
            break
        seen.add(id(exc))
        exc = nxt
    text = last_line(exc, limit) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:limit]


class ChurnError(Exception):
    """Base class for errors that end in one readable line and an exit code."""

    exit_code = 1

    def __init__(self, message: str):
        # One line, always: a multi-line message would read like a traceback.
        super().__init__(" ".join(str(message).split()))


class ConfigError(ChurnError):
    """A bad config file, key, type or value (exit 2)."""

    exit_code = 2


class DataError(ChurnError):
    """Input data that cannot be used: missing path or column, bad values (exit 2)."""

    exit_code = 2


class FeatureError(DataError, ValueError):
    """Raw records that cannot be turned into the model matrix (unknown category, ...)."""

    def __init__(self, message: str, column: str | None = None, rows: list[int] | None = None):
        super().__init__(message)
        self.column = column
        self.rows = rows or []


class ResourceError(ChurnError):
    """The Ray cluster cannot provide what the job asks for (GPUs, CPUs) (exit 1)."""

    exit_code = 1


class TrainingError(ChurnError):
    """Training failed on the workers (exit 1)."""

    exit_code = 1


class TrackingError(ChurnError):
    """The MLflow tracking server or artifact store cannot be used (exit 1)."""

    exit_code = 1


class ModelNotFoundError(ChurnError):
    """A model URI that does not resolve: no such run, version, alias or model (exit 2)."""

    exit_code = 2


class NoSuchAliasError(ModelNotFoundError):
    """The registered model, or the alias on it, does not exist yet (e.g. no champion yet)."""


class GateFailedError(ChurnError):
    """A deployment gate refused the model; everything was logged first (exit 3)."""

    exit_code = 3


class RegistryError(ChurnError):
    """A registry request that cannot be done: unknown version, no staging version, nothing to roll back to (exit 2)."""

    exit_code = 2


class PromotionRefusedError(ChurnError):
    """A promotion refused by its gates (or for want of an evaluation); no alias moved (exit 3)."""

    exit_code = 3


class ServeError(ChurnError):
    """The server cannot go on (its Ray instance died) (exit 1)."""


class MonitorAlert(ChurnError):
    """`churn monitor` found a threshold crossed (drift, AUC, volume): the report is written,
    exit 4, so that a scheduler or a `ray job` chain can start retraining."""

    exit_code = 4


class LogStoreError(ChurnError):
    """The prediction log's database cannot be reached or migrated (exit 1)."""

    exit_code = 1
