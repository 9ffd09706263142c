"""Dense BFGS update of an inverse factor (SPEC §3).

H+ = (I - rho s y^T) H (I - rho y s^T) + rho s s^T, rho = 1 / (s^T y), computed in the O(d^2)
expanded form H + (rho^2 y^T H y + rho) s s^T - rho (s (Hy)^T + (Hy) s^T), then symmetrised.
The update is skipped when s^T y <= 0, when the result is non-finite, or where ``allow`` is
false (e.g. the P2 norm gate).
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
            self.h = (0.5 * (h0 + h0.T)).to(self.dtype)

    def apply(self, v: Tensor) -> Tensor:
        return self.h @ v

    def update(self, s: Tensor, y: Tensor, allow: Tensor | None = None) -> Tensor:
        new = bfgs_inverse_update(self.h, s, y)
        ok = admissible(s, y, allow) & torch.isfinite(new).all()
        self.h = torch.where(ok, new, self.h)
        return ok

    def dense(self) -> Tensor:
        return self.h.clone()

    def state_dict(self) -> dict[str, Any]:
        return {"h": self.h}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.h = state["h"].to(device=self.device, dtype=self.dtype).clone()
