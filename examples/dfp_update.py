"""Example third-party plugin: the DFP inverse update as a new factor update rule.

One small file, no edit of kfqn's core: the class is registered where it is defined, with
``@kfqn.register("factor_update")``. Use it with::

    import kfqn, dfp_update
    kfqn.register_plugin(dfp_update)
    opt = kfqn.build_optimizer(model, "kbfgs", g_side={"update": "dfp"})

or ship it in a package with an entry point in the ``kfqn`` group::

    [project.entry-points.kfqn]
    dfp = "dfp_update"

and check it with kfqn's contract suite (``pip install kfqn[test]``), in a test file::

    from kfqn.testing import factor_update_contract
    from dfp_update import DFPFactor
    test_dfp = factor_update_contract(DFPFactor)

DFP (Davidon-Fletcher-Powell) on the inverse: H+ = H + s s^T / (s^T y) - (H y)(H y)^T / (y^T H y).
It satisfies the secant equation H+ y = s and keeps H positive definite when s^T y > 0 -- in
exact arithmetic. In floating point the subtraction can cancel (pairs of very different
scales leave H+ with negative eigenvalues, or far from H+ y = s; the contract suite finds such
pairs), so an update is taken only where H+ y = s holds to 1e-4 (float32) or 1e-10 (float64)
of the size of its terms and the Cholesky factorisation of H+ succeeds (``cholesky_ex``:
decided on the device, O(d^3), fine for the small factors of an example; the built-in
``bfgs`` guards with O(d) bounds instead). A rejected pair leaves H unchanged; a non-finite
H0 or loaded state becomes I and is counted in ``resets``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

import kfqn
from kfqn.updates.base import InverseFactor, admissible


@kfqn.register("factor_update")
class DFPFactor(InverseFactor):
    name = "dfp"
    description = "DFP inverse update (example plugin): H+ = H + ss^T/s^Ty - Hy(Hy)^T/y^THy"

    def __init__(self, dim: int, dtype: torch.dtype, device: Any, **options: Any) -> None:
        super().__init__(dim, dtype, device)
        self.h = torch.eye(dim, dtype=dtype, device=self.device)

    def _finite_or_identity(self, h: Tensor) -> Tensor:
        h = h.to(device=self.device, dtype=self.dtype)
        h = torch.where(h == h.T, h, 0.5 * (h + h.T))   # symmetric entries kept bit for bit
        good = torch.isfinite(h).all()
        self.resets = self.resets + (~good).long()
        return torch.where(good, h, torch.eye(self.dim, dtype=self.dtype, device=self.device))

    def reset(self, h0: Tensor | None = None) -> None:
        self.h = (torch.eye(self.dim, dtype=self.dtype, device=self.device) if h0 is None
                  else self._finite_or_identity(h0))

    def apply(self, v: Tensor) -> Tensor:
        return self.h @ v

    def update(self, s: Tensor, y: Tensor, allow: Tensor | None = None) -> Tensor:
        hy = self.h @ y
        sy, yhy = torch.dot(s, y), torch.dot(y, hy)
        safe = lambda t: torch.where(t > 0, t, torch.ones_like(t))  # noqa: E731
        new = self.h + torch.outer(s, s) / safe(sy) - torch.outer(hy, hy) / safe(yhy)
        new = 0.5 * (new + new.T)
        ok = admissible(s, y, allow) & (yhy > 0) & torch.isfinite(new).all()
        # the secant equation in rounding: H+ y = s up to a small multiple of the size of the
        # terms of H+ y (catastrophic cancellation, e.g. in float32, breaks it)
        resid = torch.linalg.vector_norm(new @ y - s)
        size = torch.linalg.vector_norm(s) + torch.linalg.vector_norm(new.abs() @ y.abs())
        rtol = 1e-10 if self.dtype == torch.float64 else 1e-4
        ok = ok & torch.isfinite(resid) & (resid <= rtol * size)
        # positive definite in floating point: the Cholesky factorisation succeeds
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        ok = ok & (torch.linalg.cholesky_ex(torch.where(ok, new, eye)).info == 0)
        self.h = torch.where(ok, new, self.h)
        return ok

    def state_dict(self) -> dict[str, Any]:
        return {"h": self.h, "resets": self.resets}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_resets(state)
        self.h = self._finite_or_identity(state["h"].clone())
