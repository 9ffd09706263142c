"""Dense BFGS update of an inverse factor (docs/algorithms.md §3).

H+ = (I - rho s y^T) H (I - rho y s^T) + rho s s^T, rho = 1 / (s^T y), computed in the O(d^2)
expanded form H + (rho^2 y^T H y + rho) s s^T - rho (s (Hy)^T + (Hy) s^T).

:class:`BFGSFactor` applies it in place as one rank-2 product, H += U V^T with U = [s, Hy] and
V = [c s - rho Hy, -rho s] (c = rho^2 y^T H y + rho): one pass over H, no temporary of H's size
(plus the products H y and, for the H y error guard below, H^T y).
The update is skipped (V = 0, so H is left bitwise unchanged) when s^T y <= 0, when s, y or Hy
is not finite, when the increment could overflow (its entries are bounded by
bound = |c| max|s|^2 + 2 |rho| max|s| max|Hy|, and those of H by max_i H_ii as H is positive
definite), when s^T y <= cancel_tol * eps * y^T H y (the result would be lost to cancellation:
y^T H+ y = s^T y is computed from terms of size y^T H y), when the rounding of H and of the
increment (eps times max_i H_ii plus bound) exceeds ``increment_rtol`` (1e-4 in float32, 1e-9
in float64) of the new H's largest diagonal entry (terms far larger than the result would
cancel: nearly orthogonal s and y), when the increment's rounding (eps * bound) exceeds
``growth_rtol`` (0.1) of H's smallest diagonal entry (H+ keeps H's small eigenvalues, which it
would drown: an H+ with a condition number the dtype cannot hold), when the error of Hy,
estimated by w = Hy - H^T y, could lower the new H's lowest eigenvalue (by up to
rho ||w||^2 / 4) below -``hy_error_rtol`` (1e-4 in float32, 1e-9 in float64) times its largest
diagonal entry (the stored H's skew part, rounding that never decays, after H has shrunk by
orders of magnitude), or where ``allow`` is false (e.g. the P2 norm gate); the growth and H y
error guards are derived in :class:`BFGSFactor`. So H stays finite and positive definite (up to
rounding) for any input; a non-finite H0 given to :meth:`BFGSFactor.reset` or loaded is
replaced by I and counted in ``resets``.
:func:`bfgs_inverse_update` is the same update written out (symmetrised), for tests and plugins.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from kfqn.updates.base import InverseFactor
from kfqn.core.components import register
from kfqn.core.finite import const

#: (rtols, dtype, device) -> the constants of BFGSFactor.update
_CONSTS: dict = {}
#: (dims, device) -> the index tensors of BFGSFactor.update_many (read-only)
_LAYOUTS: dict = {}
#: row stride, in bytes, of the per-layer 2 x 2 coefficient blocks of BFGSFactor.update_many
#: (each block starts as aligned as a fresh allocation's small-matrix kernels may need)
_BLOCK_BYTES = 256


def _layout(dims: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor, int]:
    """(seg, pos, dmax) for layers of sizes ``dims``: ``seg`` (sum d,) the layer of each entry
    of the concatenated vectors; ``pos`` (5 sum d,) where the entries of five concatenated
    per-layer quantities go in a padded (5, L, dmax) buffer."""
    key = (dims, device)
    got = _LAYOUTS.get(key)
    if got is None:
        n, dmax = len(dims), max(dims)
        seg, pos = [], []
        for i, d in enumerate(dims):
            seg += [i] * d
        for k in range(5):
            for i, d in enumerate(dims):
                base = (k * n + i) * dmax
                pos += range(base, base + d)
        with torch.inference_mode(False):
            got = (torch.tensor(seg, dtype=torch.long, device=device),
                   torch.tensor(pos, dtype=torch.long, device=device), dmax)
        _LAYOUTS[key] = got
    return got


def bfgs_inverse_update(h: Tensor, s: Tensor, y: Tensor) -> Tensor:
    """The BFGS inverse update of ``h`` for the pair (s, y) (no admissibility checks)."""
    hy = h @ y
    sy = torch.dot(s, y)
    rho = 1.0 / torch.where(sy != 0, sy, torch.ones_like(sy))
    coef = rho * rho * torch.dot(y, hy) + rho
    new = h + coef * torch.outer(s, s) - rho * (torch.outer(s, hy) + torch.outer(hy, s))
    return 0.5 * (new + new.T)


@register('factor_update')
class BFGSFactor(InverseFactor):
    """Dense BFGS inverse factor, updated in place (module docstring).

    A pair is rejected (``update`` returns false, which the callers count as a rejected pair,
    and H is left bitwise unchanged) by each of the guards listed in the module docstring. Two
    of them keep H positive definite where the rounding of earlier updates would otherwise
    show up once later pairs shrink H by orders of magnitude (both fire only on ill-scaled
    factors: see ``benchmarks/adversarial_pairs.py``).

    The growth guard, with bound = (|c| max|s| + 2 |rho| max|Hy|) max|s| the entries' bound of
    the increment and c = rho^2 y^T H y + rho:

        reject if  eps * bound  >  growth_rtol * min_i H_ii

    Why: for s^T z = 0, z^T H+ z = z^T H z, so H+ keeps H's small eigenvalues; the increment's
    rounding (up to eps * bound in each entry) must stay below them, and min_i H_ii (O(d))
    stands in for them. One update can grow H by at most growth_rtol / eps of its smallest
    diagonal entry: a larger growth (nearly orthogonal s and y meeting a small H) gives an H+
    whose condition number the dtype cannot hold, its small eigenvalues rounding noise of
    either sign (float32: lambda_min / lambda_max = -0.047 after later pairs shrank H).

    The H y error guard:

        reject if  rho ||H y - H^T y||_2^2 / 4  >  hy_error_rtol * max_i |(H+)_ii|

    Why: the stored H = S + A is not exactly symmetric -- each update's rounding leaves a skew
    part A that later updates add to but never remove -- and the update is built from H y. Its
    symmetric part (what :meth:`dense` returns) is then BFGS(S) - rho/2 (s w^T + w s^T) with
    w = H y - H^T y = 2 A y, and since
    rho |s^T z| |w^T z| <= rho (s^T z)^2 + rho (w^T z)^2 / 4 and BFGS(S) >= rho s s^T,

        lambda_min(sym H+) >= -rho ||w||^2 / 4.

    A is at the rounding level of the largest scale H ever had; once H has shrunk by many
    orders of magnitude (an ill-scaled H0 at 1e15 brought down to 1e4 by a few pairs, say) it
    would make H indefinite. The computed w also carries the rounding of the two products, so
    it doubles as an a-posteriori estimate of the error of H y.

    In ordinary runs both stay far below their thresholds (under 2e-5 of them in float32 and
    1e-14 in float64, over thousands of damped updates with d = 64 and 256 and curvatures
    spread over up to 8 decades), so they change nothing there: the recorded trajectories
    stay bit for bit the same.
    """

    name = "bfgs"
    description = "dense BFGS inverse update, H+ y = s (docs/algorithms.md §3)"
    #: reject when eps * (max_i H_ii + bound of the increment) > increment_rtol * max_i |H+_ii|
    #: (float32, float64): the rounding left would exceed that fraction of the new H
    increment_rtol = (1e-4, 1e-9)
    #: reject when rho ||H y - H^T y||^2 / 4 > hy_error_rtol * max_i |H+_ii| (float32, float64):
    #: the error of H y (skew part of the stored H, rounding) could lower the new H's lowest
    #: eigenvalue below -hy_error_rtol times its largest
    hy_error_rtol = (1e-4, 1e-9)
    #: reject when eps * (bound of the increment) > growth_rtol * min_i H_ii (float32, float64):
    #: the rounding would drown H's small eigenvalues, which H+ keeps
    growth_rtol = (0.1, 0.1)

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device | str, **options: Any):
        super().__init__(dim, dtype, device)
        self.h = torch.eye(dim, dtype=dtype, device=self.device)

    def reset(self, h0: Tensor | None = None) -> None:
        if h0 is None:
            self.h = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        else:
            self.h = self._finite_or_identity((0.5 * (h0 + h0.T)).to(self.dtype).contiguous())

    def _finite_or_identity(self, h: Tensor) -> Tensor:
        """``h`` if every entry is finite, else I (counted in ``resets``); on the device."""
        good = torch.isfinite(h.abs().amax())
        self.resets = self.resets + (~good).long()
        eye = torch.eye(self.dim, dtype=self.dtype, device=h.device)
        return torch.where(good, h, eye).contiguous()

    def apply(self, v: Tensor) -> Tensor:
        return self.h @ v

    def apply_right(self, m: Tensor) -> Tensor:
        return m @ self.h.T

    def _consts(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
        """Cached device constants of :meth:`update`: 0, 1, the factors of its guards' left
        sides (1, eps, eps, 1) and right sides (1, increment_rtol, growth_rtol, hy_error_rtol),
        and the largest value below finfo.max / 4 (so that the overflow guard's ``<`` is a
        ``<=`` like the others)."""
        key = (self.increment_rtol, self.growth_rtol, self.hy_error_rtol, dtype, device)
        got = _CONSTS.get(key)
        if got is None:
            finfo = torch.finfo(dtype)
            f64 = finfo.bits == 64
            with torch.inference_mode(False):
                lhs = torch.tensor([1.0, finfo.eps, finfo.eps, 1.0], dtype=dtype, device=device)
                rhs = torch.tensor([1.0, self.increment_rtol[f64], self.growth_rtol[f64],
                                    self.hy_error_rtol[f64]], dtype=dtype, device=device)
                quarter = torch.tensor(finfo.max / 4, dtype=dtype, device=device)
                below = torch.nextafter(quarter, torch.tensor(float("-inf"), dtype=dtype,
                                                              device=device))
            got = (const(0.0, dtype, device), const(1.0, dtype, device), lhs, rhs, below)
            _CONSTS[key] = got
        return got

    def update(self, s: Tensor, y: Tensor, allow: Tensor | None = None) -> Tensor:
        # few torch calls on purpose: on a GPU each costs a kernel launch from Python (and on
        # the CPU each pays the dispatcher's fixed cost): constants are cached device tensors,
        # and the four guards after the first are one vector comparison
        h = self.h
        zero, one, lhs_k, rhs_k, below_quarter_max = self._consts(h.dtype, h.device)
        hy = h @ y
        u = torch.stack([s, hy], dim=1)                      # U = [s, Hy]
        y_row = y.unsqueeze(0)
        sy, yhy = y_row.mm(u).squeeze_(0).unbind()           # s^T y, y^T H y
        s_max, hy_max = u.abs().amax(0).unbind()             # NaN / inf propagate
        finfo = torch.finfo(h.dtype)
        # s^T y > 0, and large enough not to be lost to cancellation against y^T H y (NaN: no)
        ok = sy > (self.cancel_tol * finfo.eps * yhy).clamp_min(0.0)
        if allow is not None:
            ok = ok & allow
        rho = torch.reciprocal(torch.where(ok, sy, one))
        coef = (rho * yhy + 1.0) * rho
        rho2 = 2.0 * rho
        # entries of the increment are bounded by (|c| max|s| + 2 |rho| max|Hy|) max|s|, those
        # of the positive definite H by max_i H_ii; a non-finite s, y or Hy makes the bound NaN
        # or inf, and the comparison false
        bound = (coef.abs() * s_max + rho2.abs() * hy_max) * s_max
        h_diag = torch.diagonal(h)
        h_max = h_diag.abs().amax()
        bh = bound + h_max
        # rounding of H and of the increment (about eps * (max|H| + bound)) must stay small
        # against the new H, whose entries are bounded by its largest diagonal entry (O(d) to
        # compute): otherwise terms far larger than the result cancel and leave noise of
        # either sign
        new_max = (h_diag + (coef * s - rho2 * hy) * s).abs().amax()
        # H+ agrees with H on the complement of s, so H's small eigenvalues live on in H+: the
        # increment's rounding (eps * bound) must stay small against them too, for which the
        # smallest diagonal entry of H stands in (class docstring)
        h_min = h_diag.amin()
        # the error of Hy: w = Hy - H^T y (the stored H's skew part, rounding of every update
        # since H0 that never decays, plus the rounding of the two products) puts
        # -rho/2 (s w^T + w s^T) into H+, which lowers its lowest eigenvalue by at most
        # rho ||w||^2 / 4 (class docstring); that must stay small against the new H
        w_norm = torch.linalg.vector_norm(hy - y_row.mm(h))
        skew = 0.25 * (rho * w_norm) * w_norm
        # the guards, elementwise  lhs_k * [bh, bh, bound, skew] <= rhs_k * [max/4-, new_max,
        # h_min, new_max]:  bh < max / 4 (no overflow); eps bh <= increment_rtol new_max;
        # eps bound <= growth_rtol h_min; skew <= hy_error_rtol new_max
        lhs = torch.stack([bh, bh, bound, skew]) * lhs_k
        rhs = torch.stack([below_quarter_max, new_max, h_min, new_max]) * rhs_k
        ok = ok & (lhs <= rhs).all()
        # H += U C U^T with C = [[c, -rho], [-rho, 0]]; C = 0 and U = 0 where not ok, so a
        # rejected pair leaves H bitwise unchanged
        neg_rho = -rho
        c = torch.where(ok, torch.stack([coef, neg_rho, neg_rho, zero]), zero)
        u = torch.where(ok, u, zero)
        h.addmm_(u @ c.view(2, 2), u.T)
        return ok

    @classmethod
    def update_many(cls, factors, s, y, allow):
        """``[f.update(s_i, y_i, allow_i) ...]`` bitwise, in fewer ops: the products and dot
        products of each layer are made as :meth:`update` makes them (same ops on tensors of
        the same shapes and layouts, so the same rounding), while everything elementwise or
        exact (the scalar logic, the guards' vectors and their max / min reductions) runs once
        on the stacked values of all layers of one dtype and device. Layers of another
        ``update``, or an ``allow`` that is not a 0-dim bool tensor, go through the loop."""
        factors, s, y, allow = list(factors), list(s), list(y), list(allow)

        def key_of(i: int) -> Any:
            f, a = factors[i], allow[i]
            plain = (type(f).update is BFGSFactor.update and type(f)._consts is BFGSFactor._consts
                     and (a is None or (isinstance(a, Tensor) and a.dim() == 0
                                        and a.dtype == torch.bool and a.device == f.h.device))
                     and s[i].dim() == 1 and y[i].dim() == 1 and f.h.dim() == 2
                     and s[i].dtype == y[i].dtype == f.h.dtype
                     and s[i].device == y[i].device == f.h.device)
            return ((f.increment_rtol, f.growth_rtol, f.hy_error_rtol, f.cancel_tol, f.h.dtype,
                     f.h.device) if plain else None)

        def run_group(idx: list[int]) -> list[Tensor]:
            return cls._update_group([factors[i] for i in idx], [s[i] for i in idx],
                                     [y[i] for i in idx], [allow[i] for i in idx])
        return cls._update_grouped(factors, s, y, allow, key_of, run_group)

    @staticmethod
    def _update_group(factors, s, y, allow) -> list[Tensor]:
        """:meth:`update_many` for L >= 2 plain factors of one dtype, device and options."""
        n = len(factors)
        f0 = factors[0]
        h0 = f0.h
        dtype, device = h0.dtype, h0.device
        zero, one, lhs_k, rhs_k, below_quarter_max = f0._consts(dtype, device)
        finfo = torch.finfo(dtype)
        # per layer, as update does it: H y, U = [s, Hy], s^T y and y^T H y, w = Hy - H^T y
        hs = [f.h for f in factors]
        hys, us, syy, wn = [], [], [], []
        for h, si, yi in zip(hs, s, y):
            hy = h @ yi
            u = torch.stack([si, hy], dim=1)
            y_row = yi.unsqueeze(0)
            syy.append(y_row.mm(u))                          # (1, 2): s^T y, y^T H y
            wn.append(torch.linalg.vector_norm(hy - y_row.mm(h)))
            hys.append(hy)
            us.append(u)
        diags = [torch.diagonal(h) for h in hs]
        sy, yhy = torch.cat(syy).unbind(1)
        w_norm = torch.stack(wn)
        # the scalar logic of update, on (L,) vectors
        ok = sy > (f0.cancel_tol * finfo.eps * yhy).clamp_min(0.0)
        if any(a is not None for a in allow):
            true = const(True, torch.bool, device)
            ok = ok & torch.stack([true if a is None else a for a in allow])
        rho = torch.reciprocal(torch.where(ok, sy, one))
        coef = (rho * yhy + 1.0) * rho
        rho2 = 2.0 * rho
        # elementwise over the concatenated vectors of all layers (coef and rho2 repeated per
        # entry), then the exact max / min per layer from a padded (5, L, dmax) buffer:
        # max|s|, max|Hy|, max|H_ii|, max|H_ii + (c s - 2 rho Hy) s|, max(-H_ii)
        seg, pos, dmax = _layout(tuple(h.shape[0] for h in hs), device)
        s_cat, hy_cat, d_cat = torch.cat(s), torch.cat(hys), torch.cat(diags)
        t_cat = d_cat + (coef[seg] * s_cat - rho2[seg] * hy_cat) * s_cat
        vals = torch.cat([torch.cat([s_cat, hy_cat, d_cat, t_cat]).abs(), d_cat.neg()])
        buf = torch.full((5 * n * dmax,), float("-inf"), dtype=dtype, device=device)
        s_max, hy_max, h_max, new_max, neg_min = (
            buf.index_copy_(0, pos, vals).view(5, n, dmax).amax(2).unbind())
        h_min = neg_min.neg()
        bound = (coef.abs() * s_max + rho2.abs() * hy_max) * s_max
        bh = bound + h_max
        skew = 0.25 * (rho * w_norm) * w_norm
        lhs = torch.stack([bh, bh, bound, skew], dim=1) * lhs_k
        rhs = torch.stack([below_quarter_max.expand(n), new_max, h_min, new_max], dim=1) * rhs_k
        ok = ok & (lhs <= rhs).all(1)
        # C = [[c, -rho], [-rho, 0]] per layer, zero where not ok, each 2 x 2 block in a row of
        # its own (rows _BLOCK_BYTES apart)
        neg_rho = -rho
        width = max(4, _BLOCK_BYTES // finfo.bits * 8)
        zeros = zero.expand(n)
        c = torch.where(ok.unsqueeze(1),
                        torch.stack([coef, neg_rho, neg_rho] + [zeros] * (width - 3), dim=1), zero)
        cs = c.as_strided((n, 2, 2), (width, 2, 1)).unbind()
        oks = ok.unbind()
        for h, u, ci, oki in zip(hs, us, cs, oks):
            u = torch.where(oki, u, zero)
            h.addmm_(u @ ci, u.T)
        return list(oks)

    def dense(self) -> Tensor:
        return 0.5 * (self.h + self.h.T)

    def state_dict(self) -> dict[str, Any]:
        return {"h": self.h, "resets": self.resets}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_resets(state)
        self.h = self._finite_or_identity(state["h"].to(device=self.device, dtype=self.dtype).clone())
