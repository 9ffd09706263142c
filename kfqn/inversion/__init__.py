"""Inversion strategies for symmetric positive (semi-)definite factors: damped inverses and,
for Shampoo, inverse roots. Each strategy reports when it fell back to another path."""
from kfqn.inversion.base import Inversion, InversionResult, eigh_inverse, eigh_power
from kfqn.inversion.cholesky import CholeskyInversion, LazyCholeskyInversion
from kfqn.inversion.eigh import EighInversion

__all__ = ["Inversion", "InversionResult", "CholeskyInversion", "LazyCholeskyInversion",
           "EighInversion", "eigh_inverse", "eigh_power"]
