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

from typing import Any, Sequence

import torch
from torch import Tensor

from kfqn.core.components import Option, register
from kfqn.core.finite import const
from kfqn.updates.base import InverseFactor, _admissible

#: (kind, size, dtype, device) -> cached constant tensors of LBFGSFactor (read-only)
_CONSTS: dict = {}
#: byte stride of the per-layer p x p blocks of R in LBFGSFactor.update_many (each block
#: starts as aligned as a fresh allocation, for the triangular solves that read it)
_BLOCK_BYTES = 256


def _cached(kind: str, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Read-only constants: ``eye`` (n x n identity), ``shift`` (the row order of the shifted
    memory [S; Y; s; y] -> [S[1:]; s; Y[1:]; y] for n = p pairs), ``true1`` (a 1-element True),
    ``truecol`` (an n x 1 True), ``ones`` (n ones)."""
    key = (kind, n, dtype, device)
    t = _CONSTS.get(key)
    if t is None:
        with torch.inference_mode(False):
            if kind == "eye":
                t = torch.eye(n, dtype=dtype, device=device)
            elif kind == "shift":
                order = [*range(1, n), 2 * n, *range(n + 1, 2 * n), 2 * n + 1]
                t = torch.tensor(order, dtype=torch.long, device=device)
            elif kind == "truecol":
                t = torch.ones(n, 1, dtype=torch.bool, device=device)
            elif kind == "ones":
                t = torch.ones(n, dtype=dtype, device=device)
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

    @classmethod
    def update_many(cls, factors: Sequence["InverseFactor"], s: Sequence[Tensor],
                    y: Sequence[Tensor], allow: Sequence[Tensor | None]) -> list[Tensor]:
        """``[f.update(s_i, y_i, allow_i) ...]`` bitwise, in fewer ops: every product and dot
        product of a layer (with its memory, R, Y^T Y, the dense H; the norms) is made as
        :meth:`update` makes it, on the same operands or on fresh tensors of the same values,
        shape and layout (R of all layers in blocks ``_BLOCK_BYTES`` apart, so each starts as
        aligned as a fresh allocation), while everything elementwise or exact runs once on the
        values of all layers stacked: the guards' scalar logic, the new flags and gamma, R and
        the finiteness test from the stacked S Y^T and Y Y^T, the middle of the compact form
        (D u + gamma Y^T Y u - gamma b, -gamma u: the same (p, n) shape in every layer), and
        the writes of the p-sized state. Layers of another ``update`` or options, or an
        ``allow`` that is not a 0-dim bool tensor, go through the loop."""
        factors, s, y, allow = list(factors), list(s), list(y), list(allow)

        def key_of(i: int) -> Any:
            f, a = factors[i], allow[i]
            plain = (isinstance(f, LBFGSFactor)
                     and all(getattr(type(f), m) is getattr(LBFGSFactor, m)
                             for m in ("update", "apply", "_compact", "_derive", "uses_dense"))
                     and (a is None or (isinstance(a, Tensor) and a.dim() == 0
                                        and a.dtype == torch.bool and a.device == f._sy.device))
                     and s[i].shape == y[i].shape == (f.dim,)
                     and s[i].dtype == y[i].dtype == f._sy.dtype == f.dtype
                     and s[i].device == y[i].device == f._sy.device
                     and (f._dense is not None) == f.uses_dense)
            return ((f.memory, f.gamma_mode, f.cancel_tol, f.secant_rtol, f.dtype, f._sy.device)
                    if plain else None)

        def run_group(idx: list[int]) -> list[Tensor]:
            # the layers that keep no dense H first, then those that do by size (so that the
            # layers of each product form are neighbours in the stacked values)
            order = sorted(idx, key=lambda i: (factors[i]._dense is not None, factors[i].dim))
            oks = cls._update_group([factors[i] for i in order], [s[i] for i in order],
                                    [y[i] for i in order], [allow[i] for i in order])
            flag = dict(zip(order, oks))
            return [flag[i] for i in idx]
        return cls._update_grouped(factors, s, y, allow, key_of, run_group)

    @staticmethod
    def _compact_many(factors: list["LBFGSFactor"], mats: list[Tensor], memos: list[tuple],
                      rts: list[Tensor], dd: Tensor, g: Tensor) -> list[Tensor]:
        """``[f._compact(mat, memo) ...]`` for layers of one memory size p whose ``mats`` have
        one width n: the products of each layer as :meth:`_compact` makes them, the
        elementwise middle part once on the stacked (m, p, n) values. ``memos``: (rows, R,
        Y^T Y) of each layer; ``rts``: R^T of each layer (a view, strides as ``R.T``); ``dd``
        (m, p) and ``g`` (m,): D and gamma of the layers."""
        if len(factors) == 1:
            rows, r, yy = memos[0]
            return [factors[0]._compact(mats[0], (rows, r, dd[0], yy, g[0]))]
        p = factors[0].memory
        a, b = torch.stack([rows @ mat for (rows, _, _), mat in zip(memos, mats)]).split(p, 1)
        us = [torch.linalg.solve_triangular(r, ai, upper=True)
              for (_, r, _), ai in zip(memos, a.unbind())]
        yyu = torch.stack([yy @ u for (_, _, yy), u in zip(memos, us)])
        u = torch.stack(us)
        g3 = g.view(-1, 1, 1)
        w = dd.unsqueeze(2) * u + g3 * yyu - g3 * b
        tops = [torch.linalg.solve_triangular(rt, wi, upper=False)
                for rt, wi in zip(rts, w.unbind())]
        return [(rows.T @ torch.cat([top, gu])).addcmul_(mat, gi)
                for (rows, _, _), mat, top, gu, gi
                in zip(memos, mats, tops, ((-g3) * u).unbind(), g.unbind())]

    @classmethod
    def _update_group(cls, factors: list["LBFGSFactor"], s: list[Tensor], y: list[Tensor],
                      allow: list[Tensor | None]) -> list[Tensor]:
        """:meth:`update_many` for L >= 2 plain factors of one dtype, device and options."""
        n = len(factors)
        f0 = factors[0]
        p, dt, dev = f0.memory, f0.dtype, f0._sy.device
        zero, one = const(0.0, dt, dev), const(1.0, dt, dev)
        tol = f0.cancel_tol * torch.finfo(dt).eps
        dense = [i for i, f in enumerate(factors) if f._dense is not None]
        comp = [i for i, f in enumerate(factors) if f._dense is None]

        def pick(t: Tensor, idx: list[int]) -> Tensor:
            """The rows ``idx`` of a stacked (L, ...) tensor."""
            if len(idx) == n:
                return t
            if idx == list(range(idx[0], idx[0] + len(idx))):
                return t[idx[0]: idx[0] + len(idx)]
            return t[torch.tensor(idx, device=dev)]

        gamma = torch.stack([f.gamma for f in factors])
        d_old = torch.stack([f._d for f in factors])
        # H y of each layer, as apply makes it
        hy: list = [None] * n
        for i in dense:
            hy[i] = factors[i]._dense @ y[i]
        if comp:
            fc = [factors[i] for i in comp]
            outs = cls._compact_many(fc, [y[i][:, None] for i in comp],
                                     [(f._sy, f._r, f._yy) for f in fc], [f._r.T for f in fc],
                                     pick(d_old, comp), pick(gamma, comp))
            for i, o in zip(comp, outs):
                hy[i] = o[:, 0]
        sy, yhy, s_norm, y_norm = torch.stack(
            [torch.dot(si, yi) for si, yi in zip(s, y)]
            + [torch.dot(yi, hi) for yi, hi in zip(y, hy)]
            + [torch.linalg.vector_norm(si) for si in s]
            + [torch.linalg.vector_norm(yi) for yi in y]).view(4, n).unbind()
        # the guards of update, on (L,) vectors
        ok = (sy > 0) & (sy < float("inf"))
        if any(a is not None for a in allow):
            true = const(True, torch.bool, dev)
            ok = ok & torch.stack([true if a is None else a for a in allow])
        ok = ok & (sy > (tol * yhy).clamp_min(0.0)) & (yhy > float("-inf"))
        ok = ok & (sy / s_norm > tol * y_norm)
        # update continues with s and y zeroed where rejected, and everything it derives
        # from them only counts where the pair is accepted (a rejected pair keeps the old
        # state): so fresh copies (x * 1 = x, even -0.0; new tensors of the layout and
        # alignment that update's selections make) serve, and the new memory
        # [S[1:]; s; Y[1:]; y] needs no selection against the old one either
        fresh = torch._foreach_mul(s + y, 1.0)
        s, y = fresh[:n], fresh[n:]
        shift = _cached("shift", p, dt, dev)
        rows = [torch.cat([f._sy, torch.stack([si, yi])])[shift]
                for f, si, yi in zip(factors, s, y)]
        valid = torch.stack([f.valid for f in factors])
        valid_new = torch.cat([valid[:, 1:], _cached("truecol", n, torch.bool, dev)], 1)
        gamma_new = gamma
        if f0.gamma_mode == "scaled":
            yy = torch.stack([torch.dot(yi, yi) for yi in y])
            ratio = torch.stack([torch.dot(si, yi) for si, yi in zip(s, y)]) / torch.where(
                yy > 0, yy, one)
            ok = ok & ((ratio > 0) & torch.isfinite(ratio))
            gamma_new = torch.where(ok, ratio, gamma)
        # _derive: S Y^T and Y Y^T per layer, R and D of all layers at once
        sym, yym = [], []
        for r in rows:
            sm, ym = r.split(p)
            yt = ym.T
            sym.append(sm @ yt)
            yym.append(ym @ yt)
        sy_all = torch.stack(sym)
        d_new = torch.diagonal(sy_all, dim1=1, dim2=2)
        yy_new = torch.stack(yym)
        size = sy_all.element_size()
        block = -(-p * p * size // _BLOCK_BYTES) * _BLOCK_BYTES // size
        r_new = torch.empty(n, block, dtype=dt, device=dev)[:, : p * p].view(n, p, p)
        torch.add(torch.triu(sy_all), torch.diag_embed(torch.where(valid_new, zero, one)),
                  out=r_new)
        rs, rts = r_new.unbind(), r_new.transpose(1, 2).unbind()
        # the dense H+ of the layers that keep it (layers of one size at once), and H+ y
        dense_new: list = [None] * n
        by_dim: dict = {}
        for i in dense:
            by_dim.setdefault(factors[i].dim, []).append(i)
        for d, idx in by_dim.items():
            outs = cls._compact_many([factors[i] for i in idx],
                                     [_cached("eye", d, dt, dev)] * len(idx),
                                     [(rows[i], rs[i], yym[i]) for i in idx],
                                     [rts[i] for i in idx], pick(d_new, idx),
                                     pick(gamma_new, idx))
            for i, o in zip(idx, outs):
                dense_new[i] = o
        h_y: list = [None] * n
        hp: list = [None] * n
        for i in dense:
            h_y[i] = dense_new[i] @ y[i]
            hp[i] = torch.stack([h_y[i], dense_new[i].sum(1)])
        if comp:
            outs = cls._compact_many(
                [factors[i] for i in comp],
                [torch.stack([y[i], _cached("ones", factors[i].dim, dt, dev)], dim=1)
                 for i in comp],
                [(rows[i], rs[i], yym[i]) for i in comp], [rts[i] for i in comp],
                pick(d_new, comp), pick(gamma_new, comp))
            for i, o in zip(comp, outs):
                hp[i] = o
                h_y[i] = o[:, 0]
        resid = torch.stack([torch.linalg.vector_norm(t) for t in torch._foreach_sub(h_y, s)]
                            + [torch.linalg.vector_norm(si) for si in s]).view(2, n)
        rtol = f0.secant_rtol[dt == torch.float64]
        # finite R, Y Y^T and H+ [y, 1] (exact: t * 0 is NaN exactly where t is not finite)
        fin = (torch.cat([r_new, yy_new], 1).mul(0).sum((1, 2))
               + torch.stack(torch._foreach_norm(torch._foreach_mul(hp, 0.0), 1))) == 0
        ok = ok & fin & (resid[0] <= rtol * resid[1])
        # the writes: the memory and the dense H per layer (in place, as update), the p-sized
        # state of all layers selected at once and copied into place at one call
        oks = ok.unbind()
        for f, o, r, h in zip(factors, oks, rows, dense_new):
            torch.where(o, r, f._sy, out=f._sy)
            if h is not None:
                torch.where(o, h, f._dense, out=f._dense)
        ok1, ok2 = ok.view(n, 1), ok.view(n, 1, 1)
        torch._foreach_copy_([f.valid for f in factors],
                             torch.where(ok1, valid_new, valid).unbind())
        torch._foreach_copy_(
            [f.gamma for f in factors] + [f._r for f in factors] + [f._d for f in factors]
            + [f._yy for f in factors],
            [*torch.where(ok, gamma_new, gamma).unbind(),
             *torch.where(ok2, r_new, torch.stack([f._r for f in factors])).unbind(),
             *torch.where(ok1, d_new, d_old).unbind(),
             *torch.where(ok2, yy_new, torch.stack([f._yy for f in factors])).unbind()])
        return list(oks)

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
