"""Dense BFGS update of an inverse factor (SPEC §3).

H+ = (I - rho s y^T) H (I - rho y s^T) + rho s s^T, rho = 1 / (s^T y), computed in the O(d^2)
expanded form H + (rho^2 y^T H y + rho) s s^T - rho (s (Hy)^T + (Hy) s^T).

:class:`BFGSFactor` applies it in place as one rank-2 product, H += U V^T with U = [s, Hy] and
V = [c s - rho Hy, -rho s] (c = rho^2 y^T H y + rho): one pass over H, no temporary of H's size.
The update is skipped (V = 0, so H is left bitwise unchanged) when s^T y <= 0, when s, y or Hy
is not finite, when the increment could overflow (its entries are bounded by
|c| max|s|^2 + 2 |rho| max|s| max|Hy|), or where ``allow`` is false (e.g. the P2 norm gate).
:func:`bfgs_inverse_update` is the same update written out (symmetrised), for tests and plugins.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kfqn.updates.base import InverseFactor, admissible


def bfgs_inverse_update(h: Tensor, s: Tensor, y: Tensor) -> Tensor:
    """The BFGS inverse update of ``h`` for the pair (s, y) (no admissibility checks)."""
    hy = h @ y
    sy = torch.dot(s, y)
    rho = 1.0 / torch.where(sy != 0, sy, torch.ones_like(sy))
    coef = rho * rho * torch.dot(y, hy) + rho
    new = h + coef * torch.outer(s, s) - rho * (torch.outer(s, hy) + torch.outer(hy, s))
    return 0.5 * (new + new.T)


class BFGSFactor(InverseFactor):
    name = "bfgs"
    description = "dense BFGS inverse update, H+ y = s (SPEC §3)"

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device | str, **options: Any):
        super().__init__(dim, dtype, device)
        self.h = torch.eye(dim, dtype=dtype, device=self.device)

    def reset(self, h0: Tensor | None = None) -> None:
        if h0 is None:
            self.h = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        else:
            self.h = (0.5 * (h0 + h0.T)).to(self.dtype).contiguous()

    def apply(self, v: Tensor) -> Tensor:
        return self.h @ v

    def apply_right(self, m: Tensor) -> Tensor:
        return m @ self.h.T

    def update(self, s: Tensor, y: Tensor, allow: Tensor | None = None) -> Tensor:
        hy = self.h @ y
        sy = torch.dot(s, y)
        ok = admissible(s, y, allow)
        rho = 1.0 / torch.where(ok, sy, torch.ones_like(sy))
        coef = rho * rho * torch.dot(y, hy) + rho
        s_max = s.abs().amax()
        bound = coef.abs() * s_max * s_max + 2.0 * rho.abs() * s_max * hy.abs().amax()
        ok = ok & torch.isfinite(bound) & (bound < torch.finfo(self.h.dtype).max / 4)
        zero = torch.zeros((), dtype=s.dtype, device=s.device)
        s0, hy0 = torch.where(ok, s, zero), torch.where(ok, hy, zero)
        rho0, coef0 = torch.where(ok, rho, zero), torch.where(ok, coef, zero)
        u = torch.stack([s0, hy0], dim=1)
        v = torch.stack([coef0 * s0 - rho0 * hy0, -rho0 * s0], dim=1)
        self.h.addmm_(u, v.T)
        return ok

    def dense(self) -> Tensor:
        return 0.5 * (self.h + self.h.T)

    def state_dict(self) -> dict[str, Any]:
        return {"h": self.h}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.h = state["h"].to(device=self.device, dtype=self.dtype).clone()
