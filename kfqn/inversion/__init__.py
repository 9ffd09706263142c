"""Inversion strategies for symmetric positive definite factors."""
from kfqn.inversion.spd import CholeskyInversion, EighInversion, Inversion, InversionResult

__all__ = ["Inversion", "InversionResult", "CholeskyInversion", "EighInversion"]
