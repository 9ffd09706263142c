"""Inverting damped SPD factors: (A + lambda I)^{-1}.

``cholesky``: Cholesky inverse in the factor dtype, retried in float64, then an
eigendecomposition with eigenvalues clamped at ``min_eig``; the result reports which path ran.
``eigh``: eigendecomposition with the damping added to the clamped eigenvalues.
Uses ``torch.linalg.cholesky_ex`` so that the success test stays on the device; the fallback
paths are selected with ``torch.where`` and no ``.item()``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kfqn.core.components import Component, Option


@dataclass
class InversionResult:
    """The inverse and a device int tensor: 0 = first path, 1 = float64 retry, 2 = eigh."""

    inverse: Tensor
    fallback: Tensor


def _sym(a: Tensor) -> Tensor:
    return 0.5 * (a + a.T)


def eigh_inverse(a: Tensor, damping: float, min_eig: float = 0.0) -> Tensor:
    """(V diag(max(e, min_eig) + damping) V^T)^{-1} in float64, cast back."""
    e, v = torch.linalg.eigh(_sym(a).double())
    inv = (v / (e.clamp_min(min_eig) + damping)) @ v.T
    return inv.to(a.dtype)


class Inversion(Component):
    """Base: ``invert(a, damping)`` returns an :class:`InversionResult` for (a + damping I)^{-1}."""

    def __init__(self, **options: Any) -> None:
        self.opts = options

    def invert(self, a: Tensor, damping: float) -> InversionResult:
        raise NotImplementedError


class CholeskyInversion(Inversion):
    name = "cholesky"
    description = "Cholesky inverse, float64 retry, eigendecomposition fallback"
    options = {"min_eig": Option(0.0, "eigenvalue floor on the eigh fallback", type=float, low=0.0)}

    def invert(self, a: Tensor, damping: float) -> InversionResult:
        eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        damped = _sym(a) + damping * eye
        l32, info32 = torch.linalg.cholesky_ex(damped)
        inv32 = torch.cholesky_inverse(l32)
        l64, info64 = torch.linalg.cholesky_ex(damped.double())
        inv64 = torch.cholesky_inverse(l64).to(a.dtype)
        ok32 = (info32 == 0) & torch.isfinite(inv32).all()
        ok64 = (info64 == 0) & torch.isfinite(inv64).all()
        inv_e = eigh_inverse(a, damping, self.opts.get("min_eig", 0.0))
        inv = torch.where(ok32, inv32, torch.where(ok64, inv64, inv_e))
        fallback = torch.where(ok32, 0, torch.where(ok64, 1, 2))
        return InversionResult(_sym(inv), fallback)


class EighInversion(Inversion):
    name = "eigh"
    description = "eigendecomposition inverse with damping added to clamped eigenvalues"
    options = {"min_eig": Option(0.0, "eigenvalue floor before damping", type=float, low=0.0)}

    def invert(self, a: Tensor, damping: float) -> InversionResult:
        inv = eigh_inverse(a, damping, self.opts.get("min_eig", 0.0))
        return InversionResult(inv, torch.zeros((), dtype=torch.long, device=a.device))
