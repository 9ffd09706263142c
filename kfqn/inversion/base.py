"""Contract of inversion strategies and the eigendecomposition helpers they share.

An inversion strategy computes ``(a + damping I)^{-1}`` (:meth:`Inversion.invert`) and, where it
can, the inverse root ``(a + damping I)^{-1/p}`` (:meth:`Inversion.invert_root`, used by Shampoo
with p = 4: Gupta, Koren, Singer, *Shampoo*, ICML 2018, Alg. 1). ``a`` is symmetric positive
semi-definite up to rounding (an EMA or sum of outer products); ``damping`` is a python float or
a 0-dim tensor (K-FAC's pi-split damping is computed on the device).

Every result says which path produced it (:class:`InversionResult`), so that a fallback is
visible in ``opt.stats()`` instead of silent. Nothing here reads a value back to the host
unless a strategy's option says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor

from kfqn.core.components import Component
from kfqn.core.finite import all_finite

Damping = Union[float, Tensor]

#: ``InversionResult.fallback`` codes
FIRST_PATH, FLOAT64_RETRY, EIGH_FALLBACK, SHIFTED_FALLBACK = 0, 1, 2, 3



@dataclass
class InversionResult:
    """The inverse and a device int tensor saying which path produced it.

    ``fallback``: 0 = the strategy's first path, 1 = float64 retry, 2 = eigendecomposition
    fallback, 3 = Gershgorin-shifted float64 Cholesky (the sync-free last resort). ``clamped``: number of eigenvalues raised to the floor ``min_eig`` (0-dim long
    tensor) on the eigendecomposition path, ``None`` where no eigendecomposition ran.
    """

    inverse: Tensor
    fallback: Tensor
    clamped: Tensor | None = None


def sym(a: Tensor) -> Tensor:
    """(a + a^T) / 2."""
    return 0.5 * (a + a.T)


def finite_or_zero(a: Tensor) -> Tensor:
    """``a`` where every entry is finite (:func:`kfqn.core.finite.all_finite`), else the zero
    matrix (LAPACK must never see NaN)."""
    return torch.where(all_finite(a), a, torch.zeros_like(a))


def eigh_power(a: Tensor, damping: Damping, power: float, min_eig: float = 0.0
               ) -> tuple[Tensor, Tensor]:
    """``V diag((max(e, min_eig) + damping)^power) V^T`` in float64, cast back to ``a.dtype``.

    a = V diag(e) V^T (symmetrised first; non-finite input is replaced by zeros). power = -1 is
    the damped inverse, power = -1/p the inverse p-th root. Returns the matrix and the number of
    eigenvalues that were below ``min_eig`` (raised to it).
    """
    e, v = torch.linalg.eigh(finite_or_zero(sym(a)).double())
    if isinstance(damping, Tensor):
        damping = damping.double()
    clamped = (e < min_eig).sum()
    vals = (e.clamp_min(min_eig) + damping).pow(power)
    return ((v * vals) @ v.T).to(a.dtype), clamped


def eigh_inverse(a: Tensor, damping: Damping, min_eig: float = 0.0) -> Tensor:
    """(V diag(max(e, min_eig) + damping) V^T)^{-1} in float64, cast back."""
    return eigh_power(a, damping, -1.0, min_eig)[0]


class Inversion(Component):
    """Base: ``invert(a, damping)`` -> :class:`InversionResult` for (a + damping I)^{-1}."""

    def __init__(self, **options: Any) -> None:
        self.opts = options

    def invert(self, a: Tensor, damping: Damping) -> InversionResult:
        raise NotImplementedError

    def invert_root(self, a: Tensor, damping: Damping, root: int) -> InversionResult:
        """(a + damping I)^{-1/root} by eigendecomposition (override for other methods)."""
        out, clamped = eigh_power(a, damping, -1.0 / root, self.opts.get("min_eig", 0.0))
        return InversionResult(sym(out), torch.full((), FIRST_PATH, dtype=torch.long,
                                                    device=a.device), clamped)
