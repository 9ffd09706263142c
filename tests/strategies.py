"""Hypothesis strategies for the algebra tests: they live in :mod:`kfqn.testing.strategies`
(public, for plugin authors); this module keeps the old import path for the tests."""
from __future__ import annotations

from kfqn.testing.strategies import (  # noqa: F401
    adversarial_pair,
    adversarial_vector,
    any_pair,
    curvature_pair,
    entries,
    finite,
    scaled_curvature_pair,
    special_values,
    spd,
    symmetric_matrix,
    vector,
)

#: LBFGSFactor keyword arguments that force each of its two product forms
LBFGS_FORMS = {"dense": {"dense_factor": 10**9}, "compact": {"dense_factor": 0}}
