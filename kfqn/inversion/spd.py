"""Compatibility module: the inversion strategies now live in one file each
(:mod:`kfqn.inversion.cholesky`, :mod:`kfqn.inversion.eigh`; contract in
:mod:`kfqn.inversion.base`)."""
from kfqn.inversion.base import Inversion, InversionResult, eigh_inverse, eigh_power
from kfqn.inversion.cholesky import CholeskyInversion, LazyCholeskyInversion
from kfqn.inversion.eigh import EighInversion

__all__ = ["Inversion", "InversionResult", "CholeskyInversion", "LazyCholeskyInversion",
           "EighInversion", "eigh_inverse", "eigh_power"]
