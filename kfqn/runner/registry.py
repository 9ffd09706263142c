"""The experiment runner's component kinds, ``dataset`` and ``model``, added to the registry.

The optimizer library knows nothing of them: :func:`runner_registry` adds the kinds, their hook
specifications (``kfqn_datasets``, ``kfqn_models``) and the runner's built-ins
(:mod:`kfqn.runner.builtins`) to the process-wide registry the first time it is called.
"""
from __future__ import annotations

from kfqn.core.hookspecs import hookspec
from kfqn.core.registry import Registry, default_registry

RUNNER_KINDS = {"dataset": "kfqn_datasets", "model": "kfqn_models"}


class RunnerHookSpecs:
    """Hooks of the runner's component kinds; each returns a list of classes."""

    @hookspec
    def kfqn_datasets(self) -> list:
        """Data sets for the experiment runner."""

    @hookspec
    def kfqn_models(self) -> list:
        """Model builders for the experiment runner."""


def add_runner_kinds(registry: Registry) -> Registry:
    """``registry`` with the runner's kinds and built-ins (idempotent)."""
    from kfqn.runner import builtins

    registry.add_kinds(RUNNER_KINDS, RunnerHookSpecs, [builtins])
    return registry


def runner_registry() -> Registry:
    """The process-wide registry, with the runner's kinds."""
    return add_runner_kinds(default_registry())
