"""Errors of the experiment runner.

All derive from :class:`kfqn.core.errors.KfqnError`, so the CLI reports them in one line and
exits with status 2.
"""
from __future__ import annotations

from kfqn.core.errors import ConfigError, KfqnError

__all__ = ["ConfigError", "DataError", "DataUnavailableError", "RunDirError", "KfqnError"]


class DataUnavailableError(KfqnError, FileNotFoundError):
    """A data set is not on disk (or needs an optional package); the message says how to get it."""


class RunDirError(KfqnError, FileExistsError):
    """A run directory exists (or is missing) where the command expects the opposite."""


class DataError(KfqnError, ValueError):
    """A data set's content is unusable (e.g. NaN inputs); the message says which samples."""
