"""Cholesky inversion of a damped SPD factor, with float64 retry and eigendecomposition fallback.

(a + damping I)^{-1} = L^{-T} L^{-1} with a + damping I = L L^T (``torch.linalg.cholesky_ex``,
so that the success test stays on the device). If the factorisation fails or the result is not
finite, it is retried in float64; if that fails too, the eigendecomposition inverse with
eigenvalues floored at ``min_eig`` is used (:func:`kfqn.inversion.base.eigh_power`). The result
reports the path taken (0, 1, 2).

Two components:

* ``cholesky``: every path is computed and the first good one selected with ``torch.where`` --
  no host synchronisation, at several times the cost of one Cholesky;
* ``cholesky_lazy``: the float64 retry and the eigendecomposition run only when needed, at the
  price of reading one success flag back to the host per inversion (a device synchronisation
  on accelerators; free on the CPU).
"""
from __future__ import annotations

import torch
from torch import Tensor

from kfqn.core.components import Option
from kfqn.inversion.base import (EIGH_FALLBACK, FIRST_PATH, FLOAT64_RETRY, Damping, Inversion,
                                 InversionResult, eigh_power, finite_or_zero, sym)


def cholesky_inverse(damped: Tensor) -> tuple[Tensor, Tensor]:
    """(inverse, ok): Cholesky inverse of an SPD matrix and a device bool 'it worked'."""
    chol, info = torch.linalg.cholesky_ex(damped)
    inv = torch.cholesky_inverse(chol)
    return inv, (info == 0) & torch.isfinite(inv).all()


class CholeskyInversion(Inversion):
    name = "cholesky"
    description = "Cholesky inverse, float64 retry, eigendecomposition fallback"
    options = {"min_eig": Option(0.0, "eigenvalue floor on the eigh fallback", type=float, low=0.0)}
    #: run the retries only when the first attempt failed (one host read per inversion)
    lazy = False

    def invert(self, a: Tensor, damping: Damping) -> InversionResult:
        dev = a.device
        eye = torch.eye(a.shape[0], dtype=a.dtype, device=dev)
        damped = finite_or_zero(sym(a)) + damping * eye
        inv1, ok1 = cholesky_inverse(damped)
        min_eig = self.opts.get("min_eig", 0.0)
        code = lambda c: torch.full((), c, dtype=torch.long, device=dev)  # noqa: E731
        if self.lazy:
            if bool(ok1):
                return InversionResult(sym(inv1), code(FIRST_PATH))
            if a.dtype != torch.float64:
                inv2, ok2 = cholesky_inverse(damped.double())
                if bool(ok2):
                    return InversionResult(sym(inv2.to(a.dtype)), code(FLOAT64_RETRY))
            inv3, clamped = eigh_power(a, damping, -1.0, min_eig)
            return InversionResult(sym(inv3), code(EIGH_FALLBACK), clamped)
        if a.dtype != torch.float64:
            inv2, ok2 = cholesky_inverse(damped.double())
            inv2 = inv2.to(a.dtype)
        else:  # a float64 retry would repeat the first path
            inv2, ok2 = inv1, ok1
        inv3, clamped = eigh_power(a, damping, -1.0, min_eig)
        inv = torch.where(ok1, inv1, torch.where(ok2, inv2, inv3))
        fallback = torch.where(ok1, code(FIRST_PATH),
                               torch.where(ok2, code(FLOAT64_RETRY), code(EIGH_FALLBACK)))
        return InversionResult(sym(inv), fallback, torch.where(ok1 | ok2, 0, clamped))


class LazyCholeskyInversion(CholeskyInversion):
    name = "cholesky_lazy"
    description = "Cholesky inverse; float64 retry and eigh fallback only on failure (host read)"
    lazy = True
