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
#: (dims, dtype, device) -> the _Layout of BFGSFactor._update_group (scratch buffers)
_LAYOUTS: dict = {}
#: scratch layouts kept (one per group shape in use)
MAX_LAYOUTS = 16
#: alignment, in bytes, of each layer's segment in the flat buffers of BFGSFactor._update_group
#: (MKL's dot products and rank-2 updates round by the alignment of their operands: each
#: layer's operands start as aligned as a fresh allocation, so that a group of layers rounds
#: as each layer alone does)
_ALIGN_BYTES = 64


class _Layout:
    """Flat scratch buffers for the layers of sizes ``dims`` of one BFGS group, with the views
    of every layer built once. Each layer owns the segment [off_i, off_i + d_i) of every
    buffer row (segments ``_ALIGN_BYTES`` aligned; the padding between them stays zero):

    * ``x`` (2, n): [s; H y] end to end -- row i of the per-layer U^T = [s, Hy]^T;
    * ``a`` (2, n): [c s - rho H y; -rho s] -- the per-layer V^T of H += V U^T;
    * ``k`` (3, n): per-entry copies of the coefficients (c, 2 rho, -rho);
    * ``v`` (5, n): the rows whose per-layer maxima the guards need
      (|s|, |Hy|, |H_ii|, |H_ii + (c s - 2 rho Hy) s|, -H_ii);
    * ``w`` (n,): w = H y - H^T y; ``yf`` (n,): y;
    * ``prod`` (3, n): [s * y; Hy * y; w * w], summed per layer into s^T y, y^T H y, ||w||^2.

    Scratch only: nothing returned by an update aliases it."""

    def __init__(self, dims: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        align = max(1, _ALIGN_BYTES // torch.finfo(dtype).bits * 8)
        offs, lengths, seg, n = [], [], [], 0
        for i, d in enumerate(dims):
            width = -(-d // align) * align
            offs.append(n)
            lengths += [d, width - d]
            seg += [i] * width
            n += width
        self.n, self.offs = n, offs
        with torch.inference_mode(False):
            z = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)
            self.x, self.a, self.k, self.v, self.w = z(2, n), z(2, n), z(3, n), z(5, n), z(n)
            self.yf = z(n)
            self.prod = z(3, n)
            self.prod01, self.prod2, self.prod_t = self.prod[0:2], self.prod[2], self.prod.T
            self.seg = torch.tensor(seg, dtype=torch.long, device=device)
            self.lengths = torch.tensor(lengths, dtype=torch.long, device=device)
            self.widths = torch.tensor([a + b for a, b in zip(lengths[0::2], lengths[1::2])],
                                       dtype=torch.long, device=device)
            cut = [slice(o, o + d) for o, d in zip(offs, dims)]
            self.xs = [self.x[:, c] for c in cut]                    # U^T of each layer
            self.x_s = [self.x[0, c] for c in cut]
            self.x_hy = [self.x[1, c] for c in cut]
            self.at = [self.a[:, c].T for c in cut]                  # V of each layer
            self.w_l = [self.w[c] for c in cut]
            self.bq = None                               # (L,) finfo.max / 4, below, at first use
            self.diag = [self.v[2, c] for c in cut]
            self.y_l = [self.yf[c] for c in cut]
            self.x0, self.x1 = self.x.unbind()
            self.a0 = self.a[0]
            self.k0, self.k1, self.k2 = self.k.unbind()
            self.k02 = self.k[0::2]                                  # (c, -rho) per entry
            self.v01, self.v23 = self.v[0:2], self.v[2:4]
            _, _, self.v2, self.v3, self.v4 = self.v.unbind()
            self.vt = self.v.T


def _layout(dims: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> _Layout:
    key = (dims, dtype, device)
    got = _LAYOUTS.pop(key, None)
    if got is None:
        got = _Layout(dims, dtype, device)
    _LAYOUTS[key] = got                     # most recently used last; scratch only, so the
    while len(_LAYOUTS) > MAX_LAYOUTS:      # least recently used may go (bounded memory in a
        _LAYOUTS.pop(next(iter(_LAYOUTS)))  # process that builds many differently sized models)
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

    def apply_into(self, v: Tensor, out: Tensor) -> Tensor:
        if v.dim() != 2:
            return super().apply_into(v, out)
        return torch.mm(self.h, v, out=out)

    def apply_right(self, m: Tensor) -> Tensor:
        return m @ self._views()[0]                          # m H^T, the transpose cached

    def _views(self) -> tuple[Tensor, Tensor]:
        """(H^T, diag H): views of ``self.h`` built once per tensor (``reset`` and
        ``load_state_dict`` bind a new one; updates are in place), so that a step does not
        dispatch a transpose or a diagonal."""
        got = self.__dict__.get("_h_views")
        if got is None or got[0] is not self.h:
            h = self.h
            got = self._h_views = (h, h.T, torch.diagonal(h))
        return got[1], got[2]

    def _consts(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, ...]:
        """Cached device constants of :meth:`update`: 0, 1, the factors of its guards' left
        sides (1, eps, eps, 1/4) and right sides (1, increment_rtol, -growth_rtol (it
        multiplies -min_i H_ii), hy_error_rtol),
        and the largest value below finfo.max / 4 (so that the overflow guard's ``<`` is a
        ``<=`` like the others)."""
        key = (self.increment_rtol, self.growth_rtol, self.hy_error_rtol, dtype, device)
        got = _CONSTS.get(key)
        if got is None:
            finfo = torch.finfo(dtype)
            f64 = finfo.bits == 64
            with torch.inference_mode(False):
                lhs = torch.tensor([1.0, finfo.eps, finfo.eps, 0.25], dtype=dtype, device=device)
                rhs = torch.tensor([1.0, self.increment_rtol[f64], -self.growth_rtol[f64],
                                    self.hy_error_rtol[f64]], dtype=dtype, device=device)
                quarter = torch.tensor(finfo.max / 4, dtype=dtype, device=device)
                below = torch.nextafter(quarter, torch.tensor(float("-inf"), dtype=dtype,
                                                              device=device))
            got = (const(0.0, dtype, device), const(1.0, dtype, device), lhs, rhs, below)
            _CONSTS[key] = got
        return got

    def update(self, s: Tensor, y: Tensor, allow: Tensor | None = None) -> Tensor:
        # the batched rule on a group of one layer (so that update_many is this loop bitwise)
        if allow is not None and allow.dim() != 0:
            allow = allow.reshape(())
        return BFGSFactor._update_group([self], [s], [y], [allow])[0]

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
        """The update of L >= 1 factors of one dtype, device and options (module docstring).

        Per layer only the products with H: H y, w = H y - H^T y, [s^T y, y^T H y] and the
        rank-2 update H += V U^T (U = [s, Hy], V = [c s - rho Hy, -rho s]), each written into
        or read from a layer's segment of the flat buffers of :class:`_Layout`. Everything
        else -- the scalar logic on (L,) vectors, the elementwise work on all layers' vectors
        end to end, the per-layer maxima by one segmented reduction, the zeroing of rejected
        pairs -- runs once for the group."""
        n = len(factors)
        f0 = factors[0]
        dtype, device = f0.h.dtype, f0.h.device
        zero, one, lhs_k, rhs_k, below_quarter_max = f0._consts(dtype, device)
        eps = torch.finfo(dtype).eps
        lay = _layout(tuple(f.h.shape[0] for f in factors), dtype, device)
        views = [f._views() for f in factors]
        # s, diag H and y into their segments (one op), then per layer H y and w
        torch._foreach_copy_(lay.x_s + lay.diag + lay.y_l,
                             [*s, *(dg for _, dg in views), *y])
        for f, (ht, _), yi, hy, w in zip(factors, views, y, lay.x_hy, lay.w_l):
            torch.mv(f.h, yi, out=hy)
            torch.addmv(hy, ht, yi, alpha=-1.0, out=w)
        # s^T y, y^T H y and ||w||^2 of every layer: one segmented sum of the products
        torch.mul(lay.x, lay.yf, out=lay.prod01)
        torch.mul(lay.w, lay.w, out=lay.prod2)
        sy, yhy, w_sq = torch.segment_reduce(lay.prod_t, "sum", lengths=lay.widths,
                                             axis=0).unbind(1)
        # s^T y > 0, and large enough not to be lost to cancellation against y^T H y (NaN: no)
        ok = sy > (f0.cancel_tol * eps * yhy).clamp_min(0.0)
        if any(a is not None for a in allow):
            true = const(True, torch.bool, device)
            ok = ok & torch.stack([true if a is None else a for a in allow])
        # (where not ok, rho and what follows may be anything: those layers are rejected by
        # ``ok`` below, and their U and coefficients zeroed before H is touched)
        rho = torch.reciprocal(sy)
        coef = torch.addcmul(one, rho, yhy) * rho            # c = rho^2 y^T H y + rho
        rho2 = rho + rho
        # c, 2 rho, -rho for every entry of the layer's segment
        torch.index_select(torch.stack([coef, rho2, rho.neg()]), 1, lay.seg, out=lay.k)
        # the rows to reduce per layer: |s|, |Hy| (NaN / inf propagate), |H_ii|,
        # |H_ii + (c s - 2 rho Hy) s| (the new diagonal), -H_ii
        torch.neg(lay.v2, out=lay.v4)
        t = torch.mul(lay.k0, lay.x0).addcmul_(lay.k1, lay.x1, value=-1.0)
        torch.addcmul(lay.v2, t, lay.x0, out=lay.v3)
        torch.abs(lay.x, out=lay.v01)
        lay.v23.abs_()
        # the per-layer maxima (segments alternate layer, padding)
        s_max, hy_max, h_max, new_max, neg_min = torch.segment_reduce(
            lay.vt, "max", lengths=lay.lengths, axis=0)[0::2].unbind(1)
        # entries of the increment are bounded by (|c| max|s| + 2 |rho| max|Hy|) max|s|, those
        # of the positive definite H by max_i H_ii; a non-finite s, y or Hy makes the bound NaN
        # or inf, and the comparison false
        bound = torch.addcmul(coef.abs() * s_max, rho2.abs(), hy_max) * s_max
        bh = bound + h_max
        skew = rho * w_sq                                    # times 1/4 in lhs_k
        # the guards, elementwise  lhs_k * [bh, bh, bound, skew] <= rhs_k * [max/4-, new_max,
        # h_min, new_max] (class docstring)
        lhs = torch.stack([bh, bh, bound, skew], dim=1) * lhs_k
        if lay.bq is None:
            lay.bq = below_quarter_max.expand(n)
        rhs = torch.stack([lay.bq, new_max, neg_min, new_max], dim=1) * rhs_k
        ok = ok & (lhs <= rhs).all(1)
        # U and the coefficients zero where rejected, so that H is left unchanged
        ok_e = ok[lay.seg]
        torch.where(ok_e, lay.x, zero, out=lay.x)
        torch.where(ok_e, lay.k02, zero, out=lay.k02)
        # V^T = [c s - rho Hy; -rho s]
        torch.mul(lay.k02, lay.x0, out=lay.a)
        lay.a0.addcmul_(lay.k2, lay.x1)
        for f, v, u in zip(factors, lay.at, lay.xs):
            f.h.addmm_(v, u)
        return list(ok.unbind())

    def dense(self) -> Tensor:
        return 0.5 * (self.h + self.h.T)

    def state_dict(self) -> dict[str, Any]:
        return {"h": self.h, "resets": self.resets}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_resets(state)
        self.h = self._finite_or_identity(state["h"].to(device=self.device, dtype=self.dtype).clone())
