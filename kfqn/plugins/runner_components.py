"""Built-in data sets and models for the experiment runner (filled in by the runner work)."""
from __future__ import annotations

from kfqn.core.hookspecs import hookimpl


@hookimpl
def kfqn_datasets() -> list:
    return []


@hookimpl
def kfqn_models() -> list:
    return []
