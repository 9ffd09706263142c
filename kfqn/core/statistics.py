"""The one path through which each step's layer statistics flow.

The capture hooks (:mod:`kfqn.layers.capture`) record, per preconditioned layer, what its
preconditioner declared it needs (:data:`kfqn.preconditioners.base.STATISTICS`); at the step
the optimizer gathers them into one :class:`StepStatistics`, keyed by layer name, and hands each
layer's :class:`LayerStatistics` to its preconditioner. This is the single place where a step's
statistics exist together: where a data-parallel reduction or a graph capture attaches.
"""
from __future__ import annotations

from dataclasses import dataclass

from kfqn.layers.capture import Capture


@dataclass
class LayerStatistics:
    """One layer's statistics of one step.

    ``current``: the capture at theta (input, output gradient where kept, sampled-label output
    gradients where asked for, the number of positions); ``trial``: the capture of the extra
    pass at the trial point (filled before ``after_trial``), else None."""

    current: Capture
    trial: Capture | None = None


class StepStatistics(dict):
    """layer name -> :class:`LayerStatistics` for every layer that delivered statistics this step
    (layers whose forward did not run, or whose gradient is None, are absent)."""
