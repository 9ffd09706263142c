"""Shampoo (docs/algorithms.md §4 baseline): the A-side and G-side estimators named ``shampoo``."""
from kfqn.core.hookspecs import hookimpl
from kfqn.curvature.shampoo import ShampooA, ShampooG


@hookimpl
def kfqn_a_estimators() -> list:
    return [ShampooA]


@hookimpl
def kfqn_g_estimators() -> list:
    return [ShampooG]
