"""Example third-party plugin: the DFP inverse update as a new factor update rule.

One small file, no edit of kfqn's core. Use it with::

    import kfqn, dfp_update
    kfqn.register_plugin(dfp_update)
    opt = kfqn.build_optimizer(model, "kbfgs", g_side={"update": "dfp"})

or ship it in a package with an entry point in the ``kfqn`` group::

    [project.entry-points.kfqn]
    dfp = "dfp_update"

DFP (Davidon-Fletcher-Powell) on the inverse: H+ = H + s s^T / (s^T y) - (H y)(H y)^T / (y^T H y).
It satisfies the secant equation H+ y = s and keeps H positive definite when s^T y > 0.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

import kfqn
from kfqn.updates.base import InverseFactor, admissible


class DFPFactor(InverseFactor):
    name = "dfp"
    description = "DFP inverse update (example plugin): H+ = H + ss^T/s^Ty - Hy(Hy)^T/y^THy"

    def __init__(self, dim: int, dtype: torch.dtype, device: Any, **options: Any) -> None:
        super().__init__(dim, dtype, device)
        self.h = torch.eye(dim, dtype=dtype, device=self.device)

    def reset(self, h0: Tensor | None = None) -> None:
        self.h = torch.eye(self.dim, dtype=self.dtype, device=self.device) if h0 is None else h0.clone()

    def apply(self, v: Tensor) -> Tensor:
        return self.h @ v

    def update(self, s: Tensor, y: Tensor, allow: Tensor | None = None) -> Tensor:
        hy = self.h @ y
        sy, yhy = torch.dot(s, y), torch.dot(y, hy)
        safe = lambda t: torch.where(t > 0, t, torch.ones_like(t))  # noqa: E731
        new = self.h + torch.outer(s, s) / safe(sy) - torch.outer(hy, hy) / safe(yhy)
        new = 0.5 * (new + new.T)
        ok = admissible(s, y, allow) & (yhy > 0) & torch.isfinite(new).all()
        self.h = torch.where(ok, new, self.h)
        return ok

    def state_dict(self) -> dict[str, Any]:
        return {"h": self.h}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.h = state["h"].to(self.device, self.dtype).clone()


@kfqn.hookimpl
def kfqn_factor_updates() -> list:
    return [DFPFactor]
