"""Dense BFGS update of an inverse factor (docs/algorithms.md §3).

H+ = (I - rho s y^T) H (I - rho y s^T) + rho s s^T, rho = 1 / (s^T y), computed in the O(d^2)
expanded form H + (rho^2 y^T H y + rho) s s^T - rho (s (Hy)^T + (Hy) s^T).

:class:`BFGSFactor` applies it in place as one rank-2 product, H += U V^T with U = [s, Hy] and
V = [c s - rho Hy, -rho s] (c = rho^2 y^T H y + rho): one pass over H, no temporary of H's size.
The update is skipped (V = 0, so H is left bitwise unchanged) when s^T y <= 0, when s, y or Hy
is not finite, when the increment could overflow (its entries are bounded by
|c| max|s|^2 + 2 |rho| max|s| max|Hy|, and those of H by max_i H_ii as H is positive
definite), when s^T y <= cancel_tol * eps * y^T H y (the result would be lost to cancellation:
y^T H+ y = s^T y is computed from terms of size y^T H y), when the rounding of H and of the
increment (eps times max_i H_ii plus the increment's bound) exceeds ``increment_rtol`` (1e-4 in float32, 1e-9 in float64) of the new
H's largest diagonal entry (terms far larger than the result would cancel: nearly orthogonal
s and y), or where ``allow`` is false (e.g. the P2 norm gate). So H stays finite and positive definite (up to rounding) for any input; a
non-finite H0 given to :meth:`BFGSFactor.reset` or loaded is replaced by I and counted in
``resets``.
:func:`bfgs_inverse_update` is the same update written out (symmetrised), for tests and plugins.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kfqn.updates.base import InverseFactor
from kfqn.core.components import register


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
    name = "bfgs"
    description = "dense BFGS inverse update, H+ y = s (docs/algorithms.md §3)"
    #: reject when eps * (max_i H_ii + bound of the increment) > increment_rtol * max_i |H+_ii|
    #: (float32, float64): the rounding left would exceed that fraction of the new H
    increment_rtol = (1e-4, 1e-9)

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

    def update(self, s: Tensor, y: Tensor, allow: Tensor | None = None) -> Tensor:
        # few torch calls on purpose: on a GPU each costs a kernel launch from Python
        u = torch.stack([s, self.h @ y], dim=1)              # U = [s, Hy]
        sy, yhy = (y @ u).unbind()                           # s^T y, y^T H y
        s_max, hy_max = u.abs().amax(0).unbind()             # NaN / inf propagate
        finfo = torch.finfo(self.h.dtype)
        # s^T y > 0, and large enough not to be lost to cancellation against y^T H y (NaN: no)
        ok = sy > (self.cancel_tol * finfo.eps * yhy).clamp_min(0.0)
        if allow is not None:
            ok = ok & allow
        rho = 1.0 / torch.where(ok, sy, 1.0)
        coef = (rho * yhy + 1.0) * rho
        # entries of the increment are bounded by (|c| max|s| + 2 |rho| max|Hy|) max|s|, those
        # of the positive definite H by max_i H_ii; a non-finite s, y or Hy makes the bound NaN
        # or inf, and the comparison false
        bound = (coef.abs() * s_max + 2.0 * rho.abs() * hy_max) * s_max
        h_diag = torch.diagonal(self.h)
        h_max = h_diag.abs().amax()
        ok = ok & (bound + h_max < finfo.max / 4)
        # rounding of H and of the increment (about eps * (max|H| + bound)) must stay small
        # against the new H, whose entries are bounded by its largest diagonal entry (O(d) to
        # compute): otherwise terms far larger than the result cancel and leave noise of
        # either sign
        s_col, hy_col = u.unbind(1)
        new_max = (h_diag + (coef * s_col - 2.0 * rho * hy_col) * s_col).abs().amax()
        ok = ok & (finfo.eps * (bound + h_max) <= self.increment_rtol[finfo.bits == 64] * new_max)
        # H += U C U^T with C = [[c, -rho], [-rho, 0]]; C = 0 and U = 0 where not ok, so a
        # rejected pair leaves H bitwise unchanged
        c = torch.where(ok, torch.stack([coef, -rho, -rho, torch.zeros_like(rho)]), 0.0)
        u = torch.where(ok, u, 0.0)
        self.h.addmm_(u @ c.view(2, 2), u.T)
        return ok

    def dense(self) -> Tensor:
        return 0.5 * (self.h + self.h.T)

    def state_dict(self) -> dict[str, Any]:
        return {"h": self.h, "resets": self.resets}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_resets(state)
        self.h = self._finite_or_identity(state["h"].to(device=self.device, dtype=self.dtype).clone())
