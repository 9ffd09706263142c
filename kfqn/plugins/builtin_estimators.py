"""Built-in curvature estimators (A side and G side)."""
from kfqn.core.hookspecs import hookimpl
from kfqn.curvature.ema_hessian_action import EMAHessianActionA
from kfqn.curvature.minibatch_hessian_action import MinibatchHessianActionA
from kfqn.curvature.secant_pairs import SecantPairsG


@hookimpl
def kfqn_a_estimators() -> list:
    return [EMAHessianActionA, MinibatchHessianActionA]


@hookimpl
def kfqn_g_estimators() -> list:
    return [SecantPairsG]
