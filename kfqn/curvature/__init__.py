"""Curvature estimators of the Kronecker family: how each side's inverse factor (H_a, H_g) is
fed (docs/algorithms.md §3), and building blocks other preconditioners share."""
from kfqn.curvature.base import AEstimator, GEstimator, LayerContext, StepInfo
from kfqn.curvature.ema_hessian_action import EMAHessianActionA
from kfqn.curvature.minibatch_hessian_action import MinibatchHessianActionA
from kfqn.curvature.output_losses import OutputLoss
from kfqn.curvature.secant_pairs import SecantPairsG

__all__ = ["AEstimator", "GEstimator", "LayerContext", "StepInfo", "EMAHessianActionA",
           "MinibatchHessianActionA", "SecantPairsG", "OutputLoss"]
