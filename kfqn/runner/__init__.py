"""The experiment runner: data sets, models, training loop, logging, sweeps and reports.

Command line: ``kfqn train | sweep | report | components`` (:mod:`kfqn.cli`). From Python::

    from kfqn.runner import config, train_run, write_report
    base = config.base_config(config.find_config("quickstart"))
    result = train_run(config.compose_run(base, task="digits"), "runs/my_run")
    write_report("runs/my_run")

Modules, one job each: :mod:`~kfqn.runner.config` (experiment configs),
:mod:`~kfqn.runner.data` and :mod:`~kfqn.runner.models` (registered components),
:mod:`~kfqn.runner.trainer` (one run), :mod:`~kfqn.runner.sweep` (many runs),
:mod:`~kfqn.runner.report` and :mod:`~kfqn.runner.plots` (tables and figures),
:mod:`~kfqn.runner.logs`, :mod:`~kfqn.runner.checkpoint`, :mod:`~kfqn.runner.memory`.
"""
from __future__ import annotations

from typing import Any

__all__ = ["train_run", "write_report", "run_sweep", "expand", "config"]


_LAZY = {"train_run": "kfqn.runner.trainer", "write_report": "kfqn.runner.report",
         "run_sweep": "kfqn.runner.sweep", "expand": "kfqn.runner.sweep"}


def __getattr__(name: str) -> Any:  # lazy, so that importing the package stays cheap
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name == "config":
        return importlib.import_module("kfqn.runner.config")
    raise AttributeError(f"module 'kfqn.runner' has no attribute {name!r}")
