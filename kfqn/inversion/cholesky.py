"""Cholesky inversion of a damped SPD factor, with float64 retry and a last-resort fallback.

(a + damping I)^{-1} = L^{-T} L^{-1} with a + damping I = L L^T (``torch.linalg.cholesky_ex``,
so that the success test stays on the device). If the factorisation fails or the result is not
finite, it is retried in float64; if that fails too (a has eigenvalues below -damping, i.e. it is
far from positive semi-definite), a last resort runs. The result reports the path taken.

How the fallbacks run is the option ``host_reads``:

* ``on_failure``: the float64 retry and the last resort run only when needed, at the price of
  reading one success flag back to the host per inversion. The last resort is the
  eigendecomposition inverse with eigenvalues floored at ``min_eig``
  (:func:`kfqn.inversion.base.eigh_power`; code 2).
* ``never``: every path is computed and the first good one selected with ``torch.where`` -- no
  host synchronisation, at about three times the cost of one Cholesky. ``torch.linalg.eigh``
  reads its status back to the host, so here the last resort is a float64 Cholesky of
  a + (damping + r) I, where r = max_i (sum_{j != i} |a_ij| - a_ii)_+ is the Gershgorin bound
  that makes the matrix strictly diagonally dominant, hence positive definite (code 3).
* ``auto`` (default): ``on_failure`` on the CPU, where reading a flag costs nothing, and
  ``never`` on accelerators. Results on the first two paths are the same in every mode.

Whatever the mode, a result that is still not finite (entries near the dtype's largest value)
is replaced by the scaled identity of :func:`kfqn.inversion.base.diagonal_fallback` (code 4):
for any finite symmetric input and damping > 0 every strategy returns a finite symmetric
positive definite matrix (up to rounding) and never raises.

``cholesky_lazy`` is ``cholesky`` with ``host_reads: on_failure``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kfqn.core.components import Option, register
from kfqn.core.finite import all_finite
from kfqn.inversion.base import (EIGH_FALLBACK, FIRST_PATH, FLOAT64_RETRY, SHIFTED_FALLBACK,
                                 Damping, Inversion, InversionResult, clean_input, eigh_power,
                                 guard, sym)

HOST_READS = ["auto", "on_failure", "never"]


def cholesky_inverse(damped: Tensor) -> tuple[Tensor, Tensor]:
    """(inverse, ok): Cholesky inverse of an SPD matrix and a device bool 'it worked'.

    On the CPU ``torch.cholesky_inverse`` (LAPACK potri); elsewhere L^{-1} by a triangular solve
    and L^{-T} L^{-1} by a matrix product, which never read a status back to the host. potri
    raises on a zero diagonal, which a failed factorisation leaves, so it is given the identity
    where the factorisation failed (``ok`` is false there anyway): this never raises.
    """
    chol, info = torch.linalg.cholesky_ex(damped)
    if damped.device.type == "cpu":
        good = (info == 0) & (torch.diagonal(chol) > 0).all()
        eye = torch.eye(damped.shape[0], dtype=damped.dtype, device=damped.device)
        inv = torch.cholesky_inverse(torch.where(good, chol, eye))
        return inv, good & all_finite(inv)
    else:
        eye = torch.eye(damped.shape[0], dtype=damped.dtype, device=damped.device)
        linv = torch.linalg.solve_triangular(chol, eye, upper=False)
        inv = linv.T @ linv
    return inv, (info == 0) & all_finite(inv)


def gershgorin_shift(a: Tensor) -> Tensor:
    """max_i (sum_{j != i} |a_ij| - a_ii)_+ : adding it to the diagonal of the symmetric ``a``
    makes every Gershgorin disc lie in [0, inf), so a + (shift + d) I is positive definite for
    any d > 0."""
    diag = torch.diagonal(a)
    off = a.abs().sum(dim=1) - diag.abs()
    return (off - diag).clamp_min(0.0).max()


@register('inversion')
class CholeskyInversion(Inversion):
    name = "cholesky"
    description = "Cholesky inverse, float64 retry, eigh (or sync-free shifted) fallback"
    options = {
        "min_eig": Option(0.0, "eigenvalue floor on the eigh fallback", type=float, low=0.0),
        "host_reads": Option("auto", "when fallbacks run: on_failure (one host read per "
                             "inversion, eigh last resort), never (all paths computed, no host "
                             "sync, shifted-Cholesky last resort), auto (on_failure on the CPU, "
                             "never on accelerators)", choices=HOST_READS),
    }
    #: the host_reads mode when the option is not given
    default_host_reads = "auto"

    def _mode(self, a: Tensor) -> str:
        mode = self.opts.get("host_reads", self.default_host_reads)
        if mode == "auto":
            return "on_failure" if a.device.type == "cpu" else "never"
        return mode

    def invert(self, a: Tensor, damping: Damping) -> InversionResult:
        dev = a.device
        eye = torch.eye(a.shape[0], dtype=a.dtype, device=dev)
        clean = clean_input(a)
        damped = clean + damping * eye
        inv1, ok1 = cholesky_inverse(damped)
        code = lambda c: torch.full((), c, dtype=torch.long, device=dev)  # noqa: E731
        if self._mode(a) == "on_failure":
            if bool(ok1):
                return InversionResult(sym(inv1), code(FIRST_PATH))
            if a.dtype != torch.float64:
                inv2, ok2 = cholesky_inverse(damped.double())
                inv2 = inv2.to(a.dtype)
                if bool(ok2 & all_finite(inv2)):
                    return InversionResult(sym(inv2), code(FLOAT64_RETRY))
            inv3, clamped = eigh_power(a, damping, -1.0, self.opts.get("min_eig", 0.0))
            return guard(InversionResult(sym(inv3), code(EIGH_FALLBACK), clamped), a, damping)
        clean64 = clean.double()
        eye64 = torch.eye(a.shape[0], dtype=torch.float64, device=dev)
        damped64 = damped.double()
        if a.dtype != torch.float64:
            inv2, ok2 = cholesky_inverse(damped64)
            inv2 = inv2.to(a.dtype)
            ok2 = ok2 & all_finite(inv2)
        else:  # a float64 retry would repeat the first path
            inv2, ok2 = inv1, ok1
        shift = gershgorin_shift(clean64)
        margin = 1e-12 * (1.0 + torch.diagonal(clean64).abs().max())
        inv3, _ = cholesky_inverse(damped64 + (shift + margin) * eye64)
        inv = torch.where(ok1, inv1, torch.where(ok2, inv2, inv3.to(a.dtype)))
        fallback = torch.where(ok1, code(FIRST_PATH),
                               torch.where(ok2, code(FLOAT64_RETRY), code(SHIFTED_FALLBACK)))
        return guard(InversionResult(sym(inv), fallback), a, damping)


@register('inversion')
class LazyCholeskyInversion(CholeskyInversion):
    name = "cholesky_lazy"
    description = "Cholesky inverse; float64 retry and eigh fallback only on failure (host read)"
    options = {"min_eig": CholeskyInversion.options["min_eig"]}
    default_host_reads = "on_failure"
