"""L-BFGS inverse factor in compact form (docs/algorithms.md §3; Byrd, Nocedal, Schnabel 1994, eq. 2.6).

Memory: the p most recent accepted pairs, FIFO, oldest first in rows of S and Y (p, d). Slots
not yet filled hold zeros and are masked so that no host synchronisation is ever needed.
With H0 = gamma I, S = [s_i], Y = [y_i], R = triu(S^T Y), D = diag(s_i^T y_i):

    H v = gamma v + S R^{-T} ((D + gamma Y^T Y) R^{-1} S^T v - gamma Y^T v) - gamma Y R^{-1} S^T v

which is identical to the two-loop recursion and, while the memory holds every pair since H0,
to dense BFGS started from gamma I. gamma = 1 (default) or s^T y / y^T y of the newest pair.
When d <= 4p the dense H is formed once per update and products use it (cheaper, same H).
Otherwise the middle matrix of H = gamma I + [S; Y]^T M [S; Y],

    M = [[R^{-T} (D + gamma Y^T Y) R^{-1}, -gamma R^{-T}], [-gamma R^{-1}, 0]]  (2p x 2p),

is formed once per update, so that a product with H is three products with the memory
(4 p d flops per column) plus gamma v; the p x p work of all layers of one memory size is
batched (one triangular solve, bmm) at the update.

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
#: byte stride of the per-layer blocks of the stacked p x p / 2p x 2p matrices of
#: LBFGSFactor._derive_group (each block starts as aligned as a fresh allocation: the BLAS and
#: LAPACK kernels round by the alignment of their operands, and a group of layers must round
#: as each layer alone does); also the alignment of each layer's segment of the flat vectors
_BLOCK_BYTES = 256
#: (p, dims, dtype, device) -> the _Layout of an L-BFGS group (scratch buffers and views)
_LAYOUTS: dict = {}
#: scratch layouts kept (one per group shape in use)
MAX_LAYOUTS = 16


def _cached(kind: str, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Read-only constants: ``eye`` (n x n identity), ``shift`` (the row order of the shifted
    memory [S; Y; s; y] -> [S[1:]; s; Y[1:]; y] for n = p pairs), ``true1`` (a 1-element True),
    ``truecol`` (an n x 1 True), ``ones`` (n ones), ``zeros`` (n x n zeros)."""
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
            elif kind == "zeros":
                t = torch.zeros(n, n, dtype=dtype, device=device)
            else:
                t = torch.ones(1, dtype=torch.bool, device=device)
        _CONSTS[key] = t
    return t


def _stacked(n: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An (n, *shape) tensor whose n blocks start ``_BLOCK_BYTES`` apart."""
    numel = 1
    for k in shape:
        numel *= k
    size = torch.finfo(dtype).bits // 8
    block = -(-numel * size // _BLOCK_BYTES) * _BLOCK_BYTES // size
    return torch.zeros(n, block, dtype=dtype, device=device)[:, :numel].view(n, *shape)


class _Layout:
    """Scratch buffers of one L-BFGS group (memory p, layers of sizes ``dims``), with the
    views of every layer built once:

    * ``x`` (3, n): [s; H y; y] end to end, each layer's segment ``_BLOCK_BYTES`` aligned;
      ``ones`` (n,) after ``x`` so that [y; 1] is one (2, d) view per layer;
    * ``rows_l``: the new memory [S[1:]; s; Y[1:]; y] (2p, d) of each layer;
    * ``dots`` (L, 3): [s^T y, y^T H y, y^T y] of each layer;
    * ``g`` (L, 2p, p): [S Y^T; Y Y^T] of each layer's new memory (blocks aligned);
    * ``mid`` (L, 2p, 2p): the new middle matrices M (blocks aligned), its blocks as views.

    Scratch only: what an update keeps is copied out of it."""

    def __init__(self, p: int, dims: tuple[int, ...], dense: tuple[bool, ...],
                 dtype: torch.dtype, device: torch.device):
        size = torch.finfo(dtype).bits // 8
        align = max(1, _BLOCK_BYTES // size)
        offs, seg, n = [], [], 0
        for i, d in enumerate(dims):
            width = -(-d // align) * align
            offs.append(n)
            seg += [i] * width
            n += width
        L = len(dims)
        with torch.inference_mode(False):
            self.x = torch.zeros(4, n, dtype=dtype, device=device)
            cut = [slice(o, o + d) for o, d in zip(offs, dims)]
            for c in cut:
                self.x[3, c] = 1.0
            self.s_l = [self.x[0, c] for c in cut]
            self.hy_l = [self.x[1, c] for c in cut]
            self.y_l = [self.x[2, c] for c in cut]
            self.y1_l = [self.x[2:4, c].T for c in cut]             # [y, 1] (d, 2)
            self.shyy_l = [self.x[0:3, c] for c in cut]             # [s; Hy; y]
            self.rows_l = [torch.zeros(2 * p, d, dtype=dtype, device=device) for d in dims]
            self.rows_t = [r.T for r in self.rows_l]
            self.y_t = [r[p:].T for r in self.rows_l]
            self.dots = torch.zeros(L, 3, dtype=dtype, device=device)
            self.ninf = torch.full((L,), float("-inf"), dtype=dtype, device=device)
            self.dots_l = list(self.dots.unbind())
            self.dots_cols = self.dots.T.unbind()
            self.seg = torch.tensor(seg, dtype=torch.long, device=device)
            # 1 for the layers in the compact form (gamma [y, 1] is added to their H+ [y, 1])
            self.compact = torch.tensor([0.0 if h else 1.0 for h in dense], dtype=dtype,
                                        device=device)
            # [S Y^T; Y Y^T] and M of each layer in one row (each part aligned), so that one
            # reduction tests them all for finiteness
            g_len = -(-2 * p * p * size // _BLOCK_BYTES) * _BLOCK_BYTES // size
            self.gm = _stacked(L, (g_len + 4 * p * p,), dtype, device)
            self.g = self.gm[:, : 2 * p * p].view(L, 2 * p, p)
            self.g_l = list(self.g.unbind())
            self.syt, self.yyt = self.g[:, :p], self.g[:, p:]
            self.g_last = self.g[:, :, p - 1]                       # [S y; Y y] (newest y)
            self.mid = self.gm[:, g_len:].view(L, 2 * p, 2 * p)
            # [rows y, rows 1] and M [rows y, rows 1] of each layer; H+ [y; 1] end to end
            self.w = _stacked(L, (2 * p, 2), dtype, device)
            self.w0 = self.w[:, :, 0]
            self.w1_l = list(self.w[:, :, 1].unbind())
            self.z = _stacked(L, (2 * p, 2), dtype, device)
            self.z_l = list(self.z.unbind())
            self.hp = torch.zeros(2, n, dtype=dtype, device=device)
            self.hp0, self.y1_rows, self.x0 = self.hp[0], self.x[2:4], self.x[0]
            self.hp_t = [self.hp[:, c].T for c in cut]
            self.hp0_l = [self.hp[0, c] for c in cut]
            self.hp1_l = [self.hp[1, c] for c in cut]
            self.diff = torch.zeros(n, dtype=dtype, device=device)
            self.diff_l = [self.diff[c] for c in cut]
            self.zero = torch.zeros(2, n, dtype=dtype, device=device)
            self.zero_l = [self.zero[:, c] for c in cut]
            self.mid_l = list(self.mid.unbind())
            self.tl, self.tr = self.mid[:, :p, :p], self.mid[:, :p, p:]
            self.bl, self.br = self.mid[:, p:, :p], self.mid[:, p:, p:]
            self.q = _stacked(L, (p, p), dtype, device)
            self.q_diag = torch.diagonal(self.q, dim1=1, dim2=2)
            # R and R^{-1} with at least two blocks: LAPACK's batched triangular solve rounds
            # a batch of one differently from a batch of several (the spare block: R = I)
            self.r_all = _stacked(max(L, 2), (p, p), dtype, device)
            self.r_all[L:] = torch.eye(p, dtype=dtype, device=device)
            self.rinv_all = _stacked(max(L, 2), (p, p), dtype, device)
            self.r, self.rinv = self.r_all[:L], self.rinv_all[:L]
            self.tmp = _stacked(L, (p, p), dtype, device)
            self.rinv_t = self.rinv.mT


def _layout(factors: list["LBFGSFactor"]) -> _Layout:
    f0 = factors[0]
    p, dt, dev = f0.memory, f0.dtype, f0._sy.device
    dims, dense = tuple(f.dim for f in factors), tuple(f.uses_dense for f in factors)
    key = (p, dims, dense, dt, dev)
    got = _LAYOUTS.pop(key, None)
    if got is None:
        got = _Layout(p, dims, dense, dt, dev)
    _LAYOUTS[key] = got                     # most recently used last; scratch only: the
    while len(_LAYOUTS) > MAX_LAYOUTS:      # least recently used may go (bounded memory)
        _LAYOUTS.pop(next(iter(_LAYOUTS)))
    return got


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
        #: [S; Y; s; y]: the memory and two rows where an update puts the new pair, so that
        #: the new memory [S[1:]; s; Y[1:]; y] is one gather
        self._store = torch.zeros(2 * p + 2, d, dtype=self.dtype, device=self.device)
        self._sy = self._store[: 2 * p]
        self._pair_s, self._pair_y = self._store[2 * p:].unbind()
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
        """Recompute the middle matrix M or, where :attr:`uses_dense`, the dense H, after a
        change (as an update derives them: bitwise the same function of the memory)."""
        p = self.memory
        (r, d, yy, mid), dense = LBFGSFactor._derive_group(
            [self], [self._sy], [self._sy.T], [self._sy[p:].T], self.valid[None],
            self.gamma[None])
        self._dense = dense[0]
        self._mid = None if self._dense is not None else mid[0].clone()
        self._bind_views()

    def _bind_views(self) -> None:
        """The views that products read, built once per state tensor (updates are in place):
        [S; Y]^T and M^T."""
        self._sy_t = self._sy.T
        self._mid_t = None if self._mid is None else self._mid.T

    @staticmethod
    def _derive_group(factors: list["LBFGSFactor"], rows: list[Tensor], rows_t: list[Tensor],
                      y_t: list[Tensor], valid: Tensor, gamma: Tensor
                      ) -> tuple[tuple[Tensor, ...], list[Tensor | None]]:
        """((R, D, Y^T Y, M) stacked (L, ...), [dense H or None]) of the memories ``rows`` =
        [S; Y] (2p, d) of L layers of one memory size (``rows_t``: their transposes, ``y_t``: Y^T),
        flags ``valid`` (L, p), ``gamma`` (L,); the stacked values are views of scratch.

        Per layer one product [S; Y] Y^T and, where H is kept dense, H = gamma I + [S; Y]^T M
        [S; Y]; the rest at once on the stacked (L, p, p) values:
        R = triu(S Y^T) + diag(1 on empty slots), R^{-1} by one batched triangular solve, and
        M = [[R^{-T} (D + gamma Y^T Y) R^{-1}, -gamma R^{-T}], [-gamma R^{-1}, 0]]."""
        f0 = factors[0]
        p, dt, dev = f0.memory, f0.dtype, rows[0].device
        lay = _layout(factors)
        for r, yt, g in zip(rows, y_t, lay.g_l):
            torch.mm(r, yt, out=g)                           # [S Y^T; Y Y^T]
        zero, one = const(0.0, dt, dev), const(1.0, dt, dev)
        d = torch.diagonal(lay.syt, dim1=1, dim2=2)
        torch.add(torch.triu(lay.syt), torch.diag_embed(torch.where(valid, zero, one)),
                  out=lay.r)
        torch.linalg.solve_triangular(lay.r_all, _cached("eye", p, dt, dev), upper=True,
                                      out=lay.rinv_all)
        g3 = gamma.view(-1, 1, 1)
        torch.mul(lay.yyt, g3, out=lay.q)
        lay.q_diag.add_(d)                                   # D + gamma Y^T Y
        torch.bmm(lay.rinv_t, torch.bmm(lay.q, lay.rinv, out=lay.tmp), out=lay.tl)
        torch.mul(lay.rinv, g3.neg(), out=lay.bl)            # -gamma R^{-1}
        lay.tr.copy_(lay.bl.mT)
        dense: list = []
        for f, r, rt, m, gi in zip(factors, rows, rows_t, lay.mid_l, gamma.unbind()):
            if f.uses_dense:
                eye = _cached("eye", f.dim, dt, dev)
                dense.append(torch.addmm(eye * gi, rt, m @ r))
            else:
                dense.append(None)
        return (lay.r, d, lay.yyt, lay.mid), dense

    @staticmethod
    def _finite(tensors: list[Tensor | None]) -> Tensor:
        """0-dim bool: every entry of every tensor is finite (exact, by max |x|)."""
        maxes = [t.abs().amax().to(torch.float64) for t in tensors if t is not None]
        return torch.isfinite(torch.stack(maxes).sum())

    def apply(self, v: Tensor) -> Tensor:
        """H v for v of shape (d,) or (d, n): gamma v + [S; Y]^T (M ([S; Y] v))."""
        if self._dense is not None:
            return self._dense @ v
        return (self._sy_t @ (self._mid @ (self._sy @ v))).addcmul_(v, self.gamma)

    def apply_into(self, v: Tensor, out: Tensor) -> Tensor:
        if self._dense is None or v.dim() != 2:
            return super().apply_into(v, out)
        return torch.mm(self._dense, v, out=out)

    def apply_right(self, m: Tensor) -> Tensor:
        """m H^T for m of shape (n, d), in row form so that the output keeps d as its
        contiguous dimension: gamma m + ((m [S; Y]^T) M^T) [S; Y]."""
        if self._dense is not None:
            return m @ self._dense
        return (((m @ self._sy_t) @ self._mid_t) @ self._sy).addcmul_(m, self.gamma)

    def update(self, s: Tensor, y: Tensor, allow: Tensor | None = None) -> Tensor:
        # the batched rule on a group of one layer (so that update_many is this loop bitwise)
        if allow is not None and allow.dim() != 0:
            allow = allow.reshape(())
        return LBFGSFactor._update_group([self], [s], [y], [allow])[0]

    @classmethod
    def update_many(cls, factors: Sequence["InverseFactor"], s: Sequence[Tensor],
                    y: Sequence[Tensor], allow: Sequence[Tensor | None]) -> list[Tensor]:
        """``[f.update(s_i, y_i, allow_i) ...]`` bitwise, in fewer ops: layers of one memory
        size, options, dtype and device run through :meth:`_update_group` together (which
        ``update`` runs on one layer). Layers of another ``update`` or an ``allow`` that is
        not a 0-dim bool tensor go through the loop."""
        factors, s, y, allow = list(factors), list(s), list(y), list(allow)

        def key_of(i: int) -> Any:
            f, a = factors[i], allow[i]
            plain = (isinstance(f, LBFGSFactor)
                     and all(getattr(type(f), m) is getattr(LBFGSFactor, m)
                             for m in ("update", "apply", "_derive_group", "uses_dense"))
                     and (a is None or (isinstance(a, Tensor) and a.dim() == 0
                                        and a.dtype == torch.bool and a.device == f._sy.device))
                     and s[i].shape == y[i].shape == (f.dim,)
                     and s[i].dtype == y[i].dtype == f._sy.dtype == f.dtype
                     and s[i].device == y[i].device == f._sy.device
                     and (f._dense is not None) == f.uses_dense)
            return ((f.memory, f.gamma_mode, f.cancel_tol, f.secant_rtol, f.dtype, f._sy.device)
                    if plain else None)

        def run_group(idx: list[int]) -> list[Tensor]:
            return cls._update_group([factors[i] for i in idx], [s[i] for i in idx],
                                     [y[i] for i in idx], [allow[i] for i in idx])
        return cls._update_grouped(factors, s, y, allow, key_of, run_group)

    @classmethod
    def _update_group(cls, factors: list["LBFGSFactor"], s: list[Tensor], y: list[Tensor],
                      allow: list[Tensor | None]) -> list[Tensor]:
        """The update of L >= 1 factors of one memory size, options, dtype and device.

        Per layer only the products with the d-dimensional vectors and matrices (H y, the
        dot products [s, H y, y]^T y, the gather of the new memory, [S Y^T; Y Y^T], the dense
        H+ or H+ [y, 1], the two writes); the guards' scalar logic on (L,) vectors and the
        p x p work on the stacked (L, p, p) values (:meth:`_derive_group`) once per group."""
        n = len(factors)
        f0 = factors[0]
        p, dt, dev = f0.memory, f0.dtype, f0._sy.device
        one = const(1.0, dt, dev)
        tol = f0.cancel_tol * torch.finfo(dt).eps
        lay = _layout(factors)
        # s and y into their segments and into each memory's spare rows (one op)
        torch._foreach_copy_(
            lay.s_l + lay.y_l + [f._pair_s for f in factors] + [f._pair_y for f in factors],
            [*s, *y, *s, *y])
        # H y (current H), then [s^T y, y^T H y, y^T y] per layer
        for f, yi, hy in zip(factors, lay.y_l, lay.hy_l):
            if f._dense is not None:
                torch.mv(f._dense, yi, out=hy)
            else:
                torch.addcmul(f._sy_t @ (f._mid @ (f._sy @ yi)), yi, f.gamma, out=hy)
        for u, yi, o in zip(lay.shyy_l, lay.y_l, lay.dots_l):
            torch.mv(u, yi, out=o)
        sy, yhy, yy = lay.dots_cols
        s_norm, y_norm = torch.stack(torch._foreach_norm(lay.s_l + lay.y_l)).view(2, n).unbind()
        # the guards (module docstring) on (L,) vectors, as one strict comparison (NaN: no):
        # s^T y > max(cancel_tol eps y^T H y, 0), y^T H y > -inf, s^T y / ||s|| > cancel_tol
        # eps ||y|| (s^T y resolved above the rounding of its own dot product; divided by
        # ||s|| first so that ||s|| ||y|| cannot overflow), -s^T y > -inf
        big = torch.stack([sy, yhy, sy / s_norm, sy.neg()])
        small = torch.stack([(tol * yhy).clamp_min(0.0), lay.ninf, tol * y_norm, lay.ninf])
        ok = (big > small).all(0)
        if any(a is not None for a in allow):
            true = const(True, torch.bool, dev)
            ok = ok & torch.stack([true if a is None else a for a in allow])
        # the new memory [S[1:]; s; Y[1:]; y], one gather per layer
        shift = _cached("shift", p, dt, dev)
        for f, r in zip(factors, lay.rows_l):
            torch.index_select(f._store, 0, shift, out=r)
        valid = torch.stack([f.valid for f in factors])
        valid_new = torch.cat([valid[:, 1:], _cached("truecol", n, torch.bool, dev)], 1)
        gamma = torch.stack([f.gamma for f in factors])
        gamma_new = gamma
        if f0.gamma_mode == "scaled":
            ratio = sy / torch.where(yy > 0, yy, one)
            ok = ok & ((ratio > 0) & torch.isfinite(ratio))
            gamma_new = torch.where(ok, ratio, gamma)
        (_, _, _, mid), dense = cls._derive_group(factors, lay.rows_l, lay.rows_t, lay.y_t,
                                                  valid_new, gamma_new)
        # H+ [y, 1] (1: a probe of overflow): the row sums of a dense H+, or
        # gamma [y, 1] + [S; Y]^T M [S; Y] [y, 1] with [S; Y] y the last column of [S Y^T; Y Y^T]
        lay.w0.copy_(lay.g_last)
        for r, h, yi, w1, hp0, hp1 in zip(lay.rows_l, dense, lay.y_l, lay.w1_l, lay.hp0_l,
                                          lay.hp1_l):
            if h is not None:
                torch.mv(h, yi, out=hp0)
                torch.sum(h, 1, out=hp1)
            else:
                torch.sum(r, 1, out=w1)
        if len(dense) > sum(h is not None for h in dense):
            torch.bmm(lay.mid, lay.w, out=lay.z)
            for h, rt, z, hp_t in zip(dense, lay.rows_t, lay.z_l, lay.hp_t):
                if h is None:
                    torch.mm(rt, z, out=hp_t)
            g_e = torch.index_select(gamma_new * lay.compact, 0, lay.seg)
            lay.hp.addcmul_(lay.y1_rows, g_e)
        # ||H+ y - s|| and (exact) finiteness: t * 0 is NaN exactly where t is not finite
        torch.sub(lay.hp0, lay.x0, out=lay.diff)
        torch.mul(lay.hp, 0.0, out=lay.zero)
        resid, fin_hp = torch.stack(torch._foreach_norm(lay.diff_l)
                                    + torch._foreach_norm(lay.zero_l)).view(2, n).unbind()
        rtol = f0.secant_rtol[dt == torch.float64]
        # everything derived finite: [S Y^T; Y Y^T] (so R and D), M, H+ [y, 1] (the dense H+
        # or gamma)
        fin = lay.gm.mul(0).sum(1) + fin_hp == 0
        ok = ok & fin & (resid <= rtol * s_norm)
        # the writes: memory and M or dense H per layer, flags and gamma of all layers at once
        oks = ok.unbind()
        for f, o, r, mi, h in zip(factors, oks, lay.rows_l, lay.mid_l, dense):
            torch.where(o, r, f._sy, out=f._sy)
            if h is not None:
                torch.where(o, h, f._dense, out=f._dense)
            else:
                torch.where(o, mi, f._mid, out=f._mid)
        torch._foreach_copy_([f.valid for f in factors] + [f.gamma for f in factors],
                             [*torch.where(ok.view(n, 1), valid_new, valid).unbind(),
                              *torch.where(ok, gamma_new, gamma).unbind()])
        return list(oks)

    def state_bytes(self) -> int:
        """The pairs (with the two spare rows), flags and gamma, plus what is derived from
        them and held between steps (M, or the dense H where :attr:`uses_dense`)."""
        held = [self._store, self.valid, self.gamma]
        held.append(self._dense if self._dense is not None else self._mid)
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
        self.reset()                                        # the initial value: empty memory
        self._sy.copy_(rows)
        self.valid.copy_(valid)
        self.gamma.copy_(gamma)
        self._refresh()
        derived = self._dense if self._dense is not None else self._mid
        good = self._finite([derived, rows, gamma]) & (gamma > 0)
        self.resets = self.resets + (~good).long()
        keep = (self._sy, self.valid, self.gamma)
        self.reset()
        for t, mine in zip(keep, (self._sy, self.valid, self.gamma)):
            torch.where(good, t, mine, out=mine)
        self._refresh()
