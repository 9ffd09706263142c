"""Curvature estimators: how each side's inverse factor (H_a, H_g) is fed (docs/algorithms.md §3)."""
from kfqn.curvature.base import AEstimator, GEstimator, LayerContext, StepInfo
from kfqn.curvature.ema_hessian_action import EMAHessianActionA
from kfqn.curvature.kfac_a import KFACA
from kfqn.curvature.kfac_g import KFACG
from kfqn.curvature.minibatch_hessian_action import MinibatchHessianActionA
from kfqn.curvature.output_losses import OutputLoss
from kfqn.curvature.secant_pairs import SecantPairsG
from kfqn.curvature.shampoo import ShampooA, ShampooG

__all__ = ["AEstimator", "GEstimator", "LayerContext", "StepInfo", "EMAHessianActionA",
           "MinibatchHessianActionA", "SecantPairsG", "KFACA", "KFACG", "ShampooA", "ShampooG",
           "OutputLoss"]
