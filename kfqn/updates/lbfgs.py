"""L-BFGS inverse factor in compact form (docs/algorithms.md §3; Byrd, Nocedal, Schnabel 1994, eq. 2.6).

Memory: the p most recent accepted pairs, FIFO, oldest first in rows of S and Y (p, d). Slots
not yet filled hold zeros and are masked so that no host synchronisation is ever needed.
With H0 = gamma I, S = [s_i], Y = [y_i], R = triu(S^T Y), D = diag(s_i^T y_i):

    H v = gamma v + S R^{-T} ((D + gamma Y^T Y) R^{-1} S^T v - gamma Y^T v) - gamma Y R^{-1} S^T v

which is identical to the two-loop recursion and, while the memory holds every pair since H0,
to dense BFGS started from gamma I. gamma = 1 (default) or s^T y / y^T y of the newest pair.
When d <= 4p the dense H is formed once per update and products use it (cheaper, same H).

Guards (the first three as for dense BFGS): a pair is rejected unless 0 < s^T y < inf, s and y are finite,
s^T y > cancel_tol * eps * y^T H y (H the current factor), s^T y > cancel_tol * eps ||s|| ||y||
(s^T y resolved above the rounding of its own dot product: a pair with cos(s, y) at rounding
level has a meaningless rho = 1 / s^T y, and the compact form then carries terms up to
gamma / cos^2(s, y) times the size of H -- with a later, larger gamma they cancel in rounding
to an indefinite H; seed 5924699 of benchmarks/adversarial_pairs.py, cos ~ 4e-18, gave
lambda_min / lambda_max = -0.70; tests/test_lbfgs_pd.py), everything derived from the new
memory (R, D, Y^T Y, gamma, the dense H) is finite and the new H meets the newest secant
equation, ||H+ y - s|| <= secant_rtol ||s|| (1e-2 in float32, 1e-6 in float64: pairs of wildly
different scales in one memory can break the compact form in rounding); a rejected pair
changes nothing. A loaded
state that is not finite is replaced by the empty memory (H = I) and counted in ``resets``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kfqn.core.components import Option, register
from kfqn.core.finite import const
from kfqn.updates.base import InverseFactor, _admissible

#: (kind, size, dtype, device) -> cached constant tensors of LBFGSFactor (read-only)
_CONSTS: dict = {}


def _cached(kind: str, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Read-only constants: ``eye`` (n x n identity), ``shift`` (the row order of the shifted
    memory [S; Y; s; y] -> [S[1:]; s; Y[1:]; y] for n = p pairs), ``true1`` (a 1-element True)."""
    key = (kind, n, dtype, device)
    t = _CONSTS.get(key)
    if t is None:
        with torch.inference_mode(False):
            if kind == "eye":
                t = torch.eye(n, dtype=dtype, device=device)
            elif kind == "shift":
                order = [*range(1, n), 2 * n, *range(n + 1, 2 * n), 2 * n + 1]
                t = torch.tensor(order, dtype=torch.long, device=device)
            else:
                t = torch.ones(1, dtype=torch.bool, device=device)
        _CONSTS[key] = t
    return t


@register('factor_update')
class LBFGSFactor(InverseFactor):
    name = "lbfgs"
    description = "limited-memory BFGS (p pairs, FIFO, H0 = gamma I), compact form (docs/algorithms.md §3)"
    accepts_dense_init = False
    #: keep H dense when dim <= dense_factor * memory (0: never; tests use it for both paths)
    dense_factor = 4
    #: a new memory is kept only if ||H+ y - s|| <= secant_rtol ||s|| (float32, float64)
    secant_rtol = (1e-2, 1e-6)
    options = {
        "memory": Option(100, "number of pairs p kept", type=int, low=1),
        "gamma": Option("one", "H0 = gamma I: 'one' or 'scaled' (s^T y / y^T y of the newest pair)",
                        choices=["one", "scaled"]),
    }

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device | str,
                 memory: int = 100, gamma: str = "one", dense_factor: int | None = None,
                 **options: Any):
        super().__init__(dim, dtype, device)
        if dense_factor is not None:
            self.dense_factor = dense_factor
        self.memory = int(memory)
        self.gamma_mode = gamma
        self.reset()

    def reset(self, h0: Tensor | None = None) -> None:
        if h0 is not None:
            raise ValueError("L-BFGS starts from gamma*I; a dense initial matrix is not supported")
        p, d = self.memory, self.dim
        self._sy = torch.zeros(2 * p, d, dtype=self.dtype, device=self.device)
        self.valid = torch.zeros(p, dtype=torch.bool, device=self.device)
        self.gamma = torch.ones((), dtype=self.dtype, device=self.device)
        self._refresh()

    @property
    def s(self) -> Tensor:
        """S: the stored s_i as rows, oldest first (a view of the stacked [S; Y])."""
        return self._sy[: self.memory]

    @property
    def y(self) -> Tensor:
        """Y: the stored y_i as rows, oldest first (a view of the stacked [S; Y])."""
        return self._sy[self.memory:]

    @property
    def uses_dense(self) -> bool:
        """Whether H is kept densely between updates: when d <= 4p a product with the dense
        (d, d) matrix (2 d^2 flops per column) is cheaper than the compact form (8 p d), and
        the matrix is at most twice the size of the stored pairs."""
        return self.dim <= self.dense_factor * self.memory

    def _refresh(self) -> None:
        """Recompute R (with unit diagonal on empty slots), D, Y^T Y and, where
        :attr:`uses_dense`, the dense H, after a change."""
        self._r, d, self._yy, self._dense = self._derive(self._sy, self.valid, self.gamma)
        self._d = d.clone()

    def _derive(self, sy_rows: Tensor, valid: Tensor, gamma: Tensor
                ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """(R, D, Y^T Y, dense H or None) of the memory ``sy_rows`` = [S; Y] (D a view of
        S Y^T's diagonal)."""
        p = self.memory
        s, y = sy_rows[:p], sy_rows[p:]
        sy = s @ y.T
        d = torch.diagonal(sy)
        dt, dev = self.dtype, sy_rows.device
        r = torch.triu(sy) + torch.diag(torch.where(valid, const(0.0, dt, dev), const(1.0, dt, dev)))
        yy = y @ y.T
        dense = None
        if self.uses_dense:
            dense = self._compact(_cached("eye", self.dim, dt, dev), (sy_rows, r, d, yy, gamma))
        return r, d, yy, dense

    @staticmethod
    def _finite(tensors: list[Tensor | None]) -> Tensor:
        """0-dim bool: every entry of every tensor is finite (exact, by max |x|)."""
        maxes = [t.abs().amax().to(torch.float64) for t in tensors if t is not None]
        return torch.isfinite(torch.stack(maxes).sum())

    def _compact(self, mat: Tensor, memo: tuple | None = None) -> Tensor:
        """H mat for mat (d, n), compact form: two (2p x d) products, two p x p triangular
        solves. ``memo``: (rows, R, D, Y^T Y, gamma) of another memory (default: this one)."""
        rows, r, dd, yy, g = memo or (self._sy, self._r, self._d, self._yy, self.gamma)
        p = self.memory
        ab = rows @ mat                                      # [S mat; Y mat]
        a, b = ab[:p], ab[p:]
        u = torch.linalg.solve_triangular(r, a, upper=True)
        w = dd[:, None] * u + g * (yy @ u) - g * b
        top = torch.linalg.solve_triangular(r.T, w, upper=False)
        return (rows.T @ torch.cat([top, -g * u])).addcmul_(mat, g)

    def apply(self, v: Tensor) -> Tensor:
        """H v for v of shape (d,) or (d, n)."""
        if self._dense is not None:
            return self._dense @ v
        vec = v.dim() == 1
        out = self._compact(v[:, None] if vec else v)
        return out[:, 0] if vec else out

    def apply_right(self, m: Tensor) -> Tensor:
        """m H (H is symmetric) for m of shape (n, d), in row form so that the output keeps d
        as its contiguous dimension."""
        if self._dense is not None:
            return m @ self._dense
        g, p = self.gamma, self.memory
        ab = m @ self._sy.T                                  # [m S^T, m Y^T]
        a, b = ab[:, :p], ab[:, p:]
        u = torch.linalg.solve_triangular(self._r.T, a, upper=False, left=False)  # a R^{-T}
        w = u * self._d + g * (u @ self._yy) - g * b
        top = torch.linalg.solve_triangular(self._r, w, upper=True, left=False)  # w R^{-1}
        return (torch.cat([top, -g * u], dim=1) @ self._sy).addcmul_(m, g)

    def update(self, s: Tensor, y: Tensor, allow: Tensor | None = None) -> Tensor:
        dt, dev = self.dtype, self._sy.device
        sy = torch.dot(s, y)
        ok = _admissible(sy, allow)
        # cancellation guard, as in dense BFGS (NaN or inf y^T H y rejects: a NaN or +inf
        # bound fails the comparison, -inf the second test)
        yhy = torch.dot(y, self.apply(y))
        tol = self.cancel_tol * torch.finfo(self.dtype).eps
        ok = ok & (sy > (tol * yhy).clamp_min(0.0)) & (yhy > float("-inf"))
        # s^T y must be resolved above the rounding of its own dot product (see the class
        # docstring): otherwise rho = 1 / s^T y is noise and the compact form cancels terms
        # up to gamma / cos^2(s, y) times larger than H
        # (divided by ||s|| first so that ||s|| ||y|| cannot overflow)
        sy_s = sy / torch.linalg.vector_norm(s)
        ok = ok & (sy_s > tol * torch.linalg.vector_norm(y))
        zero = const(0.0, dt, dev)
        s = torch.where(ok, s, zero)
        y = torch.where(ok, y, zero)
        # [S[1:]; s; Y[1:]; y]: one gather from [S; Y; s; y]
        shifted = torch.cat([self._sy, torch.stack([s, y])])[_cached("shift", self.memory, dt, dev)]
        rows = torch.where(ok, shifted, self._sy)
        # the new slot is valid where ok (else the old flags stay)
        valid = torch.where(ok, torch.cat([self.valid[1:], _cached("true1", 1, dt, dev)]), self.valid)
        gamma = self.gamma
        if self.gamma_mode == "scaled":
            yy = torch.dot(y, y)
            ratio = torch.dot(s, y) / torch.where(yy > 0, yy, torch.ones_like(yy))
            good_ratio = (ratio > 0) & torch.isfinite(ratio)
            ok = ok & good_ratio
            gamma = torch.where(ok, ratio, self.gamma)
        derived = self._derive(rows, valid, gamma)
        # the new memory must give a finite H that satisfies the newest secant equation
        # H+ y = s to secant_rtol (a memory mixing pairs of very different scales can break
        # the compact form in rounding): otherwise keep the old one (nothing changes)
        # (in the compact form H+ is also applied to the ones vector, a probe of overflow in
        # its intermediate products)
        r, dd, yy, dense = derived
        if dense is not None:
            h_y, probe = dense @ y, dense.sum(1)
            hp = torch.stack([h_y, probe])
        else:
            mat = torch.stack([y, torch.ones_like(y)], dim=1)
            hp = self._compact(mat, (rows, r, dd, yy, gamma))
            h_y, probe = hp.unbind(1)
        resid = torch.linalg.vector_norm(h_y - s)
        rtol = self.secant_rtol[self.dtype == torch.float64]
        # finiteness of everything derived (exact: t * 0 is NaN exactly where t is not
        # finite): D lies on R's diagonal (R = triu(S Y^T) + 0/1 there), and the probe
        # H+ 1 (the row sums of a dense H+, or the compact form's gamma 1 + ...) is not finite
        # where the dense H+ or gamma is not
        fin = torch.stack([r, yy]).mul(0).sum() + hp.mul(0).sum() == 0
        ok = ok & fin & (resid <= rtol * torch.linalg.vector_norm(s))
        # in place: the memory and what is derived from it keep their addresses
        torch.where(ok, rows, self._sy, out=self._sy)
        torch.where(ok, valid, self.valid, out=self.valid)
        torch.where(ok, gamma, self.gamma, out=self.gamma)
        for new, prev in zip(derived, (self._r, self._d, self._yy, self._dense)):
            if new is not None:
                torch.where(ok, new, prev, out=prev)
        return ok

    def state_bytes(self) -> int:
        """The pairs, flags and gamma, plus what is derived from them and held between steps
        (R, D, Y^T Y, and the dense H where :attr:`uses_dense`)."""
        held = [self._sy, self.valid, self.gamma, self._r, self._d, self._yy]
        if self._dense is not None:
            held.append(self._dense)
        return sum(t.numel() * t.element_size() for t in held)

    def state_dict(self) -> dict[str, Any]:
        return {"s": self.s, "y": self.y, "valid": self.valid, "gamma": self.gamma,
                "resets": self.resets}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["s"].shape != self.s.shape:
            raise ValueError(f"L-BFGS memory shape {tuple(state['s'].shape)} does not match "
                             f"this optimizer's {tuple(self.s.shape)} (memory, dim)")
        self._load_resets(state)
        rows = torch.cat([state["s"], state["y"]]).to(self.device, self.dtype)
        valid = state["valid"].to(self.device).clone()
        gamma = state["gamma"].to(self.device, self.dtype).clone()
        derived = self._derive(rows, valid, gamma)
        good = self._finite([*derived, rows, gamma]) & (gamma > 0)
        self.resets = self.resets + (~good).long()
        self.reset()                                        # the initial value: empty memory
        self._sy = torch.where(good, rows, self._sy)
        self.valid = torch.where(good, valid, self.valid)
        self.gamma = torch.where(good, gamma, self.gamma)
        self._refresh()
