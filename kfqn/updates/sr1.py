"""Symmetric rank-one (SR1) inverse update (Nocedal & Wright, *Numerical Optimization*, 2nd ed.,
§6.2, eq. 6.25 and the skip rule 6.26).

With v = s - H y:

    H+ = H + v v^T / (v^T y)

H+ y = s holds exactly (the secant equation), and on a quadratic with Hessian B, SR1 started
anywhere reaches H = B^{-1} after n linearly independent steps whose updates are all taken
(finite termination, Theorem 6.1 there). Unlike BFGS, H+ need not be positive definite even
when s^T y > 0, so ``keeps_positive_definite`` is False.

:class:`SR1Factor` skips the pair (H left bit for bit unchanged, ``update`` returns false) when

* ``allow`` is false, s or y is not finite, or s^T y <= 0 (the framework's convention: a pair
  the damping could not repair comes back as s = y = 0; and with s^T y <= 0, H+ y = s makes
  y^T H+ y = s^T y <= 0, so H+ is certainly not positive definite);
* |v^T y| < r ||v|| ||y|| (the standard skip rule, option ``r``, 1e-8 by default): the
  denominator is tiny against the update direction, which then blows up. v = 0 (H y = s
  already) is skipped as well: there is nothing to update;
* |v^T y| <= cancel_tol * eps * (|s^T y| + |y^T H y|): v^T y = s^T y - y^T H y is lost to
  cancellation;
* the update could overflow (max |v|^2 / |v^T y| + max |H_ij| >= finfo.max / 4), or H+ is
  not finite;
* H+ misses the secant equation in rounding: ||H+ y - s|| > secant_rtol (||s|| + || |H+| |y| ||),
  secant_rtol = 1e-4 in float32 and 1e-10 in float64, where |H+| |y| is the size of the terms
  of H+ y (at most ||H+||_F ||y||). A denominator just above the skip threshold leaves a
  relative error of about eps / r, more than float32 can carry; so does cancellation between
  H and the increment.

The increment is added as sign(v^T y) w w^T with w = v / sqrt(|v^T y|), so H stays exactly
symmetric. Everything is decided on the device (``torch.where``), nothing reads back to the
host. A non-finite H0 given to :meth:`SR1Factor.reset`, or a non-finite loaded state, is
replaced by I and counted in ``resets``. No damping of its own: the G- and A-side estimators
damp the pair (component ``damping``) before the update rule sees it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kfqn.core.components import Option, register
from kfqn.updates.base import InverseFactor, admissible


def _symmetric(h: Tensor) -> Tensor:
    """(h + h^T) / 2, keeping every entry that is already symmetric bit for bit (halving a
    subnormal number rounds it)."""
    return torch.where(h == h.T, h, 0.5 * h + 0.5 * h.T)


def _unit(v: Tensor) -> Tensor:
    """v / max|v| (v itself where that is 0 or not finite)."""
    top = v.abs().amax()
    return v / torch.where((top > 0) & torch.isfinite(top), top, torch.ones_like(top))


@register("factor_update")
class SR1Factor(InverseFactor):
    name = "sr1"
    description = ("symmetric rank-one inverse update H+ = H + vv^T/(v^T y), v = s - Hy; "
                   "H+ y = s, not always positive definite")
    satisfies_secant = True
    keeps_positive_definite = False
    #: an accepted H+ has ||H+ y - s|| <= secant_rtol (||s|| + || |H+| |y| ||) (float32, float64)
    secant_rtol = (1e-4, 1e-10)
    options = {
        "r": Option(1e-8, "skip rule: update only if |(s - Hy)^T y| >= r ||s - Hy|| ||y||",
                    type=float, low=0.0, high=1.0, open_low=True, open_high=True),
    }

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device | str,
                 r: float = 1e-8, **options: Any):
        super().__init__(dim, dtype, device)
        self.r = float(r)
        self.h = torch.eye(dim, dtype=dtype, device=self.device)

    def reset(self, h0: Tensor | None = None) -> None:
        if h0 is None:
            self.h = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        else:
            h0 = h0.to(device=self.device, dtype=self.dtype)
            self.h = self._finite_or_identity(_symmetric(h0))

    def _finite_or_identity(self, h: Tensor) -> Tensor:
        """``h`` if every entry is finite, else I (counted in ``resets``); on the device."""
        good = torch.isfinite(h.abs().amax())
        self.resets = self.resets + (~good).long()
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        return torch.where(good, h, eye).contiguous()

    def apply(self, v: Tensor) -> Tensor:
        return self.h @ v

    def apply_right(self, m: Tensor) -> Tensor:
        return m @ self.h          # H is symmetric

    def update(self, s: Tensor, y: Tensor, allow: Tensor | None = None) -> Tensor:
        h = self.h
        finfo = torch.finfo(self.dtype)
        hy = h @ y
        v = s - hy
        den = torch.dot(v, y)
        sy, yhy = torch.dot(s, y), torch.dot(y, hy)
        ok = admissible(s, y, allow)
        # skip rule, scale-free: on v / max|v| and y / max|y| (no overflow or underflow in the
        # norms); strict for v = 0 or y = 0 (nothing to update); NaN or inf compares false
        vn, yn = _unit(v), _unit(y)
        den_n = torch.dot(vn, yn)
        norms = torch.linalg.vector_norm(vn) * torch.linalg.vector_norm(yn)
        ok = ok & (den_n.abs() >= self.r * norms) & (den != 0)
        # v^T y = s^T y - y^T H y is computed from terms of that size
        ok = ok & (den.abs() > self.cancel_tol * finfo.eps * (sy.abs() + yhy.abs()))
        # H += sign * w w^T, w = v / sqrt(|v^T y|): bounded by max|w|^2; a non-finite v or
        # den makes the bound NaN or inf and the comparison false
        scale = torch.rsqrt(torch.where(ok, den.abs(), torch.ones_like(den)))
        w = torch.where(ok, v * scale, torch.zeros_like(v))
        bound = w.abs().amax().square()
        ok = ok & (bound + h.abs().amax() < finfo.max / 4)
        w = torch.where(ok, w, torch.zeros_like(w))
        sign = torch.where(den < 0, -1.0, 1.0).to(self.dtype)
        new = h + sign * torch.outer(w, w)
        # the secant equation in rounding, against the size |H+| |y| of the terms of H+ y
        # (all divided by their largest entry, so that the norms cannot overflow); a NaN or
        # inf anywhere rejects
        hy_new, size = (torch.stack([new, new.abs()]) @ torch.stack([y, y.abs()])[..., None]
                        ).squeeze(-1).unbind()
        top = torch.maximum(size.amax(), s.abs().amax())
        top = torch.where((top > 0) & torch.isfinite(top), top, torch.ones_like(top))
        resid = torch.linalg.vector_norm((hy_new - s) / top)
        ref = torch.linalg.vector_norm(s / top) + torch.linalg.vector_norm(size / top)
        rtol = self.secant_rtol[self.dtype == torch.float64]
        ok = ok & (resid <= rtol * ref) & torch.isfinite(size).all() & torch.isfinite(hy_new).all()
        self.h = torch.where(ok, new, h)
        return ok

    def dense(self) -> Tensor:
        return self.h.clone()

    def state_dict(self) -> dict[str, Any]:
        return {"h": self.h, "resets": self.resets}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_resets(state)
        h = state["h"].to(device=self.device, dtype=self.dtype)
        self.h = self._finite_or_identity(_symmetric(h))
