"""Errors a user can cause, each with the exit code the CLI returns for it.

The CLI prints ``error: <message>`` (one line) and exits with ``exit_code``;
nothing else in the library prints tracebacks for these.
"""

from __future__ import annotations


def one_line(exc: BaseException, limit: int = 500) -> str:
    """An error as one line (whitespace collapsed, at most ``limit`` characters)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:limit]


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
