"""Inverse-factor update rules (BFGS, L-BFGS, identity) and secant-pair damping rules."""
from kfqn.updates.base import Damping, DampingResult, InverseFactor
from kfqn.updates.bfgs import BFGSFactor, bfgs_inverse_update
from kfqn.updates.damping import DDV2Damping, DoubleDamping, NoDamping, PowellDamping
from kfqn.updates.identity import IdentityFactor
from kfqn.updates.lbfgs import LBFGSFactor

__all__ = [
    "InverseFactor", "Damping", "DampingResult", "BFGSFactor", "LBFGSFactor", "IdentityFactor",
    "bfgs_inverse_update", "NoDamping", "PowellDamping", "DoubleDamping", "DDV2Damping",
]
