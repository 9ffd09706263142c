"""Eigendecomposition inversion: a = V diag(e) V^T, (a + damping I)^{-1} = V diag(1/(e' +
damping)) V^T with e' = max(e, min_eig), in float64. Never raises (a non-finite result, or an
eigh that does not converge, gives the scaled identity of
:func:`kfqn.inversion.base.diagonal_fallback`, code 4); reports (``clamped``) how many
eigenvalues were below the floor, i.e. how far the factor was from positive semi-definite.
Also computes inverse p-th roots (Shampoo)."""
from __future__ import annotations

import torch
from torch import Tensor

from kfqn.core.components import Option, register
from kfqn.inversion.base import (FIRST_PATH, Damping, Inversion, InversionResult, eigh_power, guard,
                                 sym)


@register('inversion')
class EighInversion(Inversion):
    name = "eigh"
    description = "eigendecomposition inverse with damping added to clamped eigenvalues"
    options = {"min_eig": Option(0.0, "eigenvalue floor before damping", type=float, low=0.0)}

    def invert(self, a: Tensor, damping: Damping) -> InversionResult:
        inv, clamped = eigh_power(a, damping, -1.0, self.opts.get("min_eig", 0.0))
        return guard(InversionResult(sym(inv), torch.full((), FIRST_PATH, dtype=torch.long,
                                                          device=a.device), clamped), a, damping)
