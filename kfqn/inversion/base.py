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
FIRST_PATH, FLOAT64_RETRY, EIGH_FALLBACK, SHIFTED_FALLBACK, DIAGONAL_FALLBACK = 0, 1, 2, 3, 4


@dataclass
class InversionResult:
    """The inverse and a device int tensor saying which path produced it.

    ``fallback``: 0 = the strategy's first path, 1 = float64 retry, 2 = eigendecomposition
    fallback, 3 = Gershgorin-shifted float64 Cholesky (the sync-free last resort),
    4 = the scaled identity of :func:`diagonal_fallback` (every other path gave a non-finite
    result, e.g. entries near the dtype's largest value). ``clamped``: number of eigenvalues
    raised to the floor ``min_eig`` (0-dim long tensor) on the eigendecomposition path, ``None``
    where no eigendecomposition ran.
    """

    inverse: Tensor
    fallback: Tensor
    clamped: Tensor | None = None


def sym(a: Tensor) -> Tensor:
    """(a + a^T) / 2."""
    return 0.5 * (a + a.T)


def sym_safe(a: Tensor) -> Tensor:
    """(a + a^T) / 2 computed as a/2 + a^T/2: the same bits for normal numbers, and no overflow
    for finite entries near the dtype's largest value."""
    return 0.5 * a + 0.5 * a.T


def finite_or_zero(a: Tensor) -> Tensor:
    """``a`` where every entry is finite (:func:`kfqn.core.finite.all_finite`), else the zero
    matrix (LAPACK must never see NaN)."""
    return torch.where(all_finite(a), a, torch.zeros_like(a))


def clean_input(a: Tensor) -> Tensor:
    """The symmetrised ``a`` where every entry of ``a`` is finite, else the zero matrix (the
    exact test, by max |a_ij|: a finite ``a`` whose entry sum overflows is kept)."""
    finite = torch.isfinite(a.abs().amax())
    return torch.where(finite, sym_safe(a), torch.zeros_like(a))


def diagonal_fallback(a: Tensor, damping: Damping, power: float = -1.0) -> Tensor:
    """The last resort of every strategy: c I with c = (n max|a_ij| + damping)^power, computed
    in float64 and floored at the dtype's smallest normal number, so always finite and positive
    definite. n max|a_ij| bounds every eigenvalue of the symmetric ``a``, so for power = -1,
    c I <= (a + damping I)^{-1}: a conservative (short-step) inverse. Non-finite ``a`` counts as
    zero, as everywhere in the inversions."""
    a64 = clean_input(a).double()
    n = a.shape[0]
    if isinstance(damping, Tensor):
        damping = damping.double()
    big = torch.finfo(torch.float64).max
    top = (a64.abs().amax() * n).clamp_max(big) + damping
    val = top.clamp(torch.finfo(torch.float64).tiny, big).pow(power)
    val = val.clamp(torch.finfo(a.dtype).tiny, torch.finfo(a.dtype).max)
    val = torch.where(torch.isfinite(val), val, torch.ones_like(val))   # NaN damping
    return (torch.eye(n, dtype=torch.float64, device=a.device) * val).to(a.dtype)


def guard(res: "InversionResult", a: Tensor, damping: Damping, power: float = -1.0
          ) -> "InversionResult":
    """``res`` where its matrix is finite with a positive diagonal (which every SPD matrix has;
    an overflowed shift can leave a finite zero matrix), else :func:`diagonal_fallback` with
    code 4 (device selection, no host read)."""
    good = torch.isfinite(res.inverse.abs().amax()) & (torch.diagonal(res.inverse) > 0).all()
    inv = torch.where(good, res.inverse, diagonal_fallback(a, damping, power))
    code = torch.where(good, res.fallback, torch.full_like(res.fallback, DIAGONAL_FALLBACK))
    return InversionResult(inv, code, res.clamped)


def eigh_power(a: Tensor, damping: Damping, power: float, min_eig: float = 0.0
               ) -> tuple[Tensor, Tensor]:
    """``V diag((max(e, min_eig) + damping)^power) V^T`` in float64, cast back to ``a.dtype``.

    a = V diag(e) V^T (symmetrised first; non-finite input is replaced by zeros). power = -1 is
    the damped inverse, power = -1/p the inverse p-th root. Returns the matrix and the number of
    eigenvalues that were below ``min_eig`` (raised to it).
    """
    try:
        e, v = torch.linalg.eigh(clean_input(a).double())
    except RuntimeError:  # LAPACK did not converge (torch.linalg.LinAlgError): callers guard
        n = a.shape[0]
        nan = torch.full((n, n), float("nan"), dtype=a.dtype, device=a.device)
        return nan, torch.full((), n, dtype=torch.long, device=a.device)
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
        return guard(InversionResult(sym(out), torch.full((), FIRST_PATH, dtype=torch.long,
                                                          device=a.device), clamped),
                     a, damping, -1.0 / root)
