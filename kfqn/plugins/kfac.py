"""K-FAC (docs/algorithms.md §4 baseline): the A-side and G-side estimators named ``kfac``."""
from kfqn.core.hookspecs import hookimpl
from kfqn.curvature.kfac_a import KFACA
from kfqn.curvature.kfac_g import KFACG


@hookimpl
def kfqn_a_estimators() -> list:
    return [KFACA]


@hookimpl
def kfqn_g_estimators() -> list:
    return [KFACG]
