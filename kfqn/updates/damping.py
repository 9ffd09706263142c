"""Damping of secant pairs (docs/algorithms.md §3): none, Powell, double damping DD [P2], DDV2 [P1].

Damping acts on the inverse approximation H: Powell's rule with the roles of s and y swapped.
All branches are ``torch.where`` selections, so no host synchronisation happens.

Comparisons are non-strict, as in [P2 code]: Powell fires when s^T y <= mu1 y^T H y, DD's
second stage when s^T y / s^T s <= mu2.

Floating point (the per-layer ``_single``). The mixing coefficients are computed by the
textbook formulas where those are finite (and, for Powell, in [0, 1]); otherwise from the
ratios r = s^T y / y^T H y and q = s^T y / s^T s, theta = (1 - mu1) / (1 - r) and
theta2 = (1 - mu2) / (1 - q), which do not overflow. Every rule then checks its postcondition on the pair it computed, within the relative
tolerance :func:`~kfqn.updates.base.postcondition_rtol` (1e-4 in float32, 1e-10 in float64):
a pair that misses it, is not finite, or has no damped pair at all (DD with mu2 != 1 and
s^T y = s^T s: no theta2 moves s^T y) comes back as s = y = 0 with ``ok`` false in the
:class:`~kfqn.updates.base.DampingResult`, so that every update rule rejects it (s^T y = 0).
For finite input the output is always finite.

Several layers at one call (``many``, and ``flat`` for the G side's secant pairs): the layers'
vectors lie end to end in one buffer (:class:`Layout`, :class:`Work`), so that each step of a
rule is one op for all layers; the per-layer dot products are one segmented sum, accumulated in
float64 and rounded to the data dtype (not the BLAS dot of a single layer: another rounding, as
accurate or more). theta is computed as (1 - mu) / (1 - r) (r = s^T y / y^T H y for Powell,
q = s^T y / s^T s for DD's second stage) where the ratio's denominator is positive, and the
mixtures as ``lerp`` (theta = 1 where the stage is inactive). A single layer (``__call__``)
runs the same kernel, so ``many`` equals the per-layer loop bit for bit; ``_single`` keeps the
per-layer formulas above for inputs the flat path does not take (other dtypes, mixed layers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from kfqn.core.components import Option, register
from kfqn.core.finite import const, finite_exact, finite_scalar
from kfqn.updates.base import Damping, DampingResult, postcondition_rtol

HyFn = Callable[[Tensor], Tensor]
MU1 = {"mu1": Option(0.2, "Powell constant mu1", type=float, low=0.0, high=1.0,
                     open_low=True, open_high=True)}


def _safe(den: Tensor, use: Tensor) -> Tensor:
    return torch.where(use, den, const(1.0, den.dtype, den.device))


def _at_least(value: Tensor, target: Tensor, rtol: float) -> Tensor:
    """value >= target within the relative tolerance rtol (false on NaN or inf target).

    A NaN or +inf target makes target - rtol |target| NaN, so the comparison is false; only
    target = -inf needs the second test."""
    return (value >= target - rtol * target.abs()) & (target > float("-inf"))


def _powell(s: Tensor, y: Tensor, hy: Tensor, mu1: float) -> tuple[Tensor, Tensor, Tensor]:
    """(damped s, active, ok): Powell on H with its postcondition checked."""
    yhy = torch.dot(y, hy)
    sy = torch.dot(s, y)
    target = mu1 * yhy
    active = sy <= target
    theta = (1.0 - mu1) * yhy / _safe(yhy - sy, active)
    # stable form where the textbook one overflows or cancels: r <= mu1 < 1 when active, so
    # theta = (1 - mu1) / (1 - r) lies in [0, 1]; y^T H y <= 0 (y = 0, or H not positive
    # definite in rounding) takes s = H y, for which s^T y = y^T H y
    pos = yhy > 0
    r = sy / _safe(yhy, pos)
    stable = torch.where(pos, (1.0 - mu1) / (1.0 - r), const(0.0, r.dtype, r.device))
    # finite and in [0, 1] (clamp keeps NaN, which compares unequal)
    textbook = theta.clamp(0.0, 1.0) == theta
    theta = torch.where(textbook, theta, stable)
    out = torch.where(active, theta * s + (1.0 - theta) * hy, s)
    # y and H y need no finiteness test of their own: the postcondition needs a finite target
    # mu1 y^T H y, and a non-finite entry of y or H y makes the dot product y^T H y non-finite
    ok = finite_exact(out) & _at_least(torch.dot(out, y), target, postcondition_rtol(s.dtype))
    return out, active, ok


def _powell_identity(s: Tensor, y: Tensor, mu2: float | Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(damped y, active, ok): Powell with B = I, postcondition checked."""
    ss = torch.dot(s, s)
    sy = torch.dot(s, y)
    target = mu2 * ss
    active = sy <= target
    theta = (1.0 - mu2) * ss / _safe(ss - sy, active)
    pos = ss > 0
    q = sy / _safe(ss, pos)
    stable = (1.0 - mu2) / (1.0 - q)
    # s = 0: nothing to damp (the pair is useless and rejected by the update rule anyway)
    stable = torch.where(pos, stable, const(1.0, stable.dtype, stable.device))
    theta = torch.where(finite_scalar(theta), theta, stable)
    out = torch.where(active, theta * y + (1.0 - theta) * s, y)
    # s needs no finiteness test of its own: the postcondition needs a finite target
    # mu2 s^T s, and a non-finite entry of s makes s^T s non-finite
    ok = finite_exact(out) & _at_least(torch.dot(s, out), target, postcondition_rtol(s.dtype))
    return out, active, ok


def _zero_unless(ok: Tensor, s: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    zero = const(0.0, s.dtype, s.device)
    return torch.where(ok, s, zero), torch.where(ok, y, zero)


# -- several layers at one call: the flat kernels -----------------------------------------------
# The layers' vectors lie end to end in the rows of one buffer (:class:`Layout`), so that every
# elementwise step, finiteness test and selection is one op for all layers, and the per-layer
# dot products are one segmented sum. The scalar logic runs once on (L,) vectors.


class Layout:
    """L layers' vectors of sizes ``dims`` end to end in a row of length D: layer i at
    [off_i, off_i + d_i), each start 64-byte aligned (as a tensor of its own: BLAS products
    of a layer's view then round as on separate vectors); the padding stays zero.

    Per-layer dot products are segmented sums (:meth:`dots`) of the products, accumulated in
    float64 (``acc``; float32 on MPS) in index order: every layer's sum is the same whatever
    the other layers are, so a layer damped alone rounds as it does in a group."""

    def __init__(self, dims: Sequence[int], dtype: torch.dtype, device: torch.device) -> None:
        per = max(1, 64 // torch.empty((), dtype=dtype).element_size())
        self.dims = tuple(int(d) for d in dims)
        self.widths = tuple(-(-d // per) * per for d in self.dims)
        self.offs = tuple(sum(self.widths[:i]) for i in range(len(self.dims)))
        self.n, self.D = len(self.dims), sum(self.widths)
        self.dtype, self.device = dtype, torch.device(device)
        self.acc = torch.float32 if self.device.type == "mps" else torch.float64
        with torch.inference_mode(False):
            w = torch.tensor(self.widths, dtype=torch.long)
            #: the layer of each entry (padding: its layer's)
            self.seg = torch.repeat_interleave(torch.arange(self.n), w).to(self.device)
            self._w = w.to(self.device)
            pad = torch.zeros(max(self.widths), dtype=dtype, device=self.device)
        self._pads = [pad[:wi - d] if wi > d else None for d, wi in zip(self.dims, self.widths)]
        self._lengths: dict[int, Tensor] = {}
        self._bufs: dict = {}

    def rows(self, k: int, dtype: torch.dtype | None = None) -> Tensor:
        """A new zero (k, D) buffer (not an inference tensor: it may become state)."""
        with torch.inference_mode(False):
            return torch.zeros(k, self.D, dtype=dtype or self.dtype, device=self.device)

    def views(self, row: Tensor) -> list[Tensor]:
        """The layers' views of a row (D,)."""
        return [row[o:o + d] for o, d in zip(self.offs, self.dims)]

    def padded(self, ts: Sequence[Tensor]) -> list[Tensor]:
        """``ts`` (one vector per layer) with the zero padding between: a row for ``cat``."""
        out = []
        for t, p in zip(ts, self._pads):
            out.append(t)
            if p is not None:
                out.append(p)
        return out

    def dots(self, a: Tensor, b: Tensor, cast: bool = True) -> Tensor:
        """(k, L): per layer sum_j a_kj b_kj (a, b broadcast to (k, D)): one product into a
        cached ``acc`` buffer (each product rounded to the data dtype, as a BLAS dot does),
        one segmented sum in ``acc``, the sums rounded to the data dtype (``cast``) or not."""
        assert a.dim() == 2 or b.dim() == 2, "dots: one operand must be (k, D)"
        k = max(a.shape[0] if a.dim() == 2 else 1, b.shape[0] if b.dim() == 2 else 1)
        key = ("prod", k)
        prod = self._bufs.get(key)
        if prod is None:
            prod = self._bufs[key] = self.rows(k, self.acc)
        lengths = self._lengths.get(k)
        if lengths is None:
            with torch.inference_mode(False):
                lengths = self._lengths[k] = self._w.expand(k, self.n).contiguous()
        torch.mul(a, b, out=prod)
        # rounded to the data dtype (no op if it is acc): the scalar logic overflows as the
        # data dtype's own dot products would (a pair whose s^T s is inf there is rejected)
        out = torch.segment_reduce(prod, "sum", lengths=lengths, axis=1)
        return out.to(self.dtype) if cast else out

    def expand(self, v: Tensor) -> Tensor:
        """(L,) -> (D,): each layer's value over its entries."""
        return v.index_select(0, self.seg)

    def const_rows(self, key: Any, values: Sequence[float], dtype: torch.dtype) -> Tensor:
        """A cached (L,) vector of per-layer constants (read-only)."""
        k = ("const", key, tuple(float(v).hex() for v in values), dtype)
        t = self._bufs.get(k)
        if t is None:
            with torch.inference_mode(False):
                t = self._bufs[k] = torch.tensor(list(values), dtype=dtype, device=self.device)
        return t


class Work:
    """The damping rows of a :class:`Layout` (one (7, D) buffer):

    0 s, 1 y, 2 H y, 3 zero, 4 zero, 5 damped s, 6 damped y (for Powell: y)

    laid out so that each group of dot products is one strided product: [s y; y Hy] =
    rows 0:2 * rows 1:3; [out y, out 0, out out] = out * rows 1, 3, 5; [out2 0, out2 out] =
    out2 * rows 3, 5 (the products with the zero row are the exact finiteness tests: 0 * x is
    0 for finite x, NaN otherwise). Per-layer views of the rows are built once."""

    def __init__(self, lay: Layout, buf: Tensor | None = None) -> None:
        self.lay = lay
        self.buf = lay.rows(7) if buf is None else buf
        b = self.buf
        self.s, self.y, self.hy, self.out, self.out2 = b[0], b[1], b[2], b[5], b[6]
        self.sy_rows, self.yh_rows = b[0:2], b[1:3]     # [s; y] and [y; H y]
        self.s_hy = b[0:3:2]                            # [s; H y]
        self.y0o = b[1:6:2]                             # [y; 0; out]
        self.yo = b[1:6:4]                              # [y; out]
        self.zo = b[3:6:2]                              # [0; out]
        self.pair = b[5:7]
        self.head = b[0:3].view(-1)                     # rows s, y, H y end to end
        self.all = b.view(-1)
        self.y_views = lay.views(self.y)
        self.out_views = lay.views(self.out)
        self.out2_views = lay.views(self.out2)
        self._zero_tail = [torch.zeros(3 * lay.D, dtype=lay.dtype, device=lay.device)]


@dataclass
class Flat:
    """A flat damping's outcome: the damped pair in ``work.out``/``work.out2`` (not zeroed),
    ``ok``, the activations, and per layer (``acc``) sy0 = s^T y before damping, so = the
    damped s^T y and ss = the damped s^T s (valid where ``ok``)."""

    ok: Tensor
    active: dict
    sy0: Tensor
    so: Tensor
    ss: Tensor
    ok1: Tensor | None = None


def _lowered(target: Tensor, rtol: float) -> Tensor:
    """target - rtol |target|: :func:`_at_least`'s threshold (one fused op after the abs)."""
    return torch.sub(target, target.abs(), alpha=rtol)


def _flat_powell(w: Work, mu1: float, second: bool
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Powell on H of every layer: out = theta s + (1 - theta) H y into ``w.out`` (as
    ``lerp(H y, s, theta)``; theta = 1 where inactive), theta = (1 - mu1) / (1 - r),
    r = s^T y / y^T H y (0 where y^T H y <= 0: s = H y). Returns (sy, target, active, ok1,
    out^T y, out^T out).

    ``second``: a second stage follows, which needs out^T out in the data dtype and rejects
    every pair whose out is not finite (out^T out, so its target, is then NaN or inf): no
    finiteness test here, and out^T y may be non-finite where out is. Without it, out^T y
    is made NaN where out is not finite (the product with the zero row) and stays in
    ``acc`` (a sum beyond the data dtype's range passes the test as the inf it would be)."""
    lay = w.lay
    dt, dev = lay.dtype, lay.device
    sy, yhy = lay.dots(w.sy_rows, w.yh_rows).unbind()
    target = mu1 * yhy
    active = sy <= target
    pos = yhy > 0
    # r is garbage where y^T H y <= 0; the where drops it (no host-side branch)
    theta = torch.where(pos, torch.div(const(1.0 - mu1, dt, dev), 1.0 - sy / yhy),
                        const(0.0, dt, dev))
    theta = torch.where(active, theta, const(1.0, dt, dev))
    torch.lerp(w.hy, w.s, lay.expand(theta), out=w.out)
    if second:
        oy, oo = lay.dots(w.out, w.yo).unbind()
    else:
        oy, fin, oo = lay.dots(w.out, w.y0o, cast=False).unbind()
        oy = oy + fin
    # y and H y need no test of their own: a non-finite entry makes y^T H y (so the target)
    # non-finite, or out (lerp touches H y everywhere) non-finite
    ok1 = (oy >= _lowered(target, postcondition_rtol(lay.dtype))) & (target > float("-inf"))
    return sy, target, active, ok1, oy, oo


def _flat_dd(w: Work, mu1: float, mu2: Sequence[float]) -> Flat:
    """DD: Powell, then Powell with B = I on (out, y): theta2 = (1 - mu2) / (1 - q),
    q = out^T y / out^T out (1 where out = 0), y2 = theta2 y + (1 - theta2) out into
    ``w.out2`` (``lerp(out, y, theta2)``)."""
    lay = w.lay
    dt, dev = lay.dtype, lay.device
    sy0, _, act1, ok1, oy, oo = _flat_powell(w, mu1, True)
    m2 = lay.const_rows("mu2", mu2, dt)
    one_m2 = lay.const_rows("1-mu2", [1.0 - m for m in mu2], dt)
    target = m2 * oo
    active = oy <= target
    theta = torch.where(oo > 0, one_m2 / (1.0 - oy / oo), const(1.0, dt, dev))
    theta = torch.where(active, theta, const(1.0, dt, dev))
    torch.lerp(w.out, w.y, lay.expand(theta), out=w.out2)
    # out2^T out (in acc: compared as the data dtype's inf would be), NaN where out2 is not
    # finite
    so = lay.dots(w.out2, w.zo, cast=False).sum(0)
    # target >= 0 or NaN: |target| = target, and the threshold is NaN where target = inf
    ok = ok1 & (so >= target - postcondition_rtol(lay.dtype) * target)
    return Flat(ok, {"powell": act1, "second": active}, sy0, so, oo, ok1)


def _flat_ddv2(w: Work, mu1: float, mu2: Sequence[float]) -> Flat:
    """DDV2: Powell, then y2 = y + mu2 out into ``w.out2``."""
    lay = w.lay
    sy0, _, act1, ok1, oy, oo = _flat_powell(w, mu1, True)
    m2e = _expanded_mu2(lay, mu2)
    torch.addcmul(w.y, m2e, w.out, out=w.out2)
    so = lay.dots(w.out2, w.zo, cast=False).sum(0)
    target = lay.const_rows("mu2", mu2, lay.dtype) * oo
    ok = ok1 & (so >= target - postcondition_rtol(lay.dtype) * target)
    return Flat(ok, {"powell": act1, "second": const(True, torch.bool, lay.device)}, sy0, so, oo, ok1)


def _expanded_mu2(lay: Layout, mu2: Sequence[float]) -> Tensor:
    """mu2 of each layer over its entries, in the data dtype (cached)."""
    key = ("mu2e", tuple(float(m).hex() for m in mu2))
    t = lay._bufs.get(key)
    if t is None:
        with torch.inference_mode(False):
            t = lay._bufs[key] = lay.expand(lay.const_rows("mu2", mu2, lay.dtype)).clone()
    return t


def _flat_powell_only(w: Work, mu1: float, mu2: Sequence[float]) -> Flat:
    """Powell alone: the damped pair is (out, y); ``w.out2`` must hold y."""
    sy0, _, act, ok, oy, oo = _flat_powell(w, mu1, False)
    return Flat(ok, {"powell": act}, sy0, oy, oo, ok)


def _zero_unless_flat(w: Work, ok: Tensor) -> None:
    """The damped pair rows set to zero where not ``ok`` (in place)."""
    torch.where(w.lay.expand(ok), w.pair, const(0.0, w.lay.dtype, w.lay.device), out=w.pair)


def _batchable(s, y, mu2) -> bool:
    """Layers the flat path takes: >= 1, 1-D s and y of one float dtype and device, float mu2."""
    if len(s) < 1 or len(s) != len(y) or len(s) != len(mu2):
        return False
    dt, dev = s[0].dtype, s[0].device
    return (dt in (torch.float32, torch.float64)
            and all(isinstance(m, (float, int)) and not isinstance(m, bool) for m in mu2)
            and all(isinstance(t, Tensor) and t.dim() == 1 and t.dtype == dt and t.device == dev
                    for t in (*s, *y))
            and all(a.shape == b.shape for a, b in zip(s, y)))


class _FlatRule:
    """The list interface (``__call__``, ``many``) of a damping with a flat kernel
    (``_flat(work, mu2)``): the pairs are copied into the rule's cached :class:`Work` rows
    (one ``cat``), damped for all layers at once, zeroed where not ok.

    ``many`` returns views of the rule's buffers, valid until its next call with the same
    layer sizes; ``__call__`` (one layer) returns fresh tensors. Both round alike: a layer's
    result does not depend on the other layers."""

    #: the kernel needs y in the damped-y row (Powell alone)
    _y_in_out2 = False

    def _work(self, dims: tuple[int, ...], dtype: torch.dtype, device: torch.device,
              key: str) -> Work:
        cache = self.__dict__.setdefault("_works", {})
        k = (key, dims, dtype, device)
        w = cache.get(k)
        if w is None:
            if len(cache) > 64:
                cache.clear()
            w = cache[k] = Work(Layout(dims, dtype, device))
        return w

    def _run(self, s: list[Tensor], y: list[Tensor], hy: list[Tensor], mu2: list[float],
             key: str) -> tuple[Work, Flat]:
        w = self._work(tuple(t.shape[0] for t in s), s[0].dtype, s[0].device, key)
        lay = w.lay
        if self._y_in_out2:   # rows 0..6 at once: s, y, H y, 0, 0, (out), y
            z = w._zero_tail[0]
            torch.cat(lay.padded(s) + lay.padded(y) + lay.padded(hy) + [z] + lay.padded(y),
                      out=w.all)
        else:
            torch.cat(lay.padded(s) + lay.padded(y) + lay.padded(hy), out=w.head)
        res = self._flat(w, mu2)
        res.active = self.finish_active(res)
        _zero_unless_flat(w, res.ok)
        return w, res

    def _hys(self, hy, y):
        hys = [h(yi) for h, yi in zip(hy, y)]
        good = all(isinstance(h, Tensor) and h.shape == yi.shape and h.dtype == yi.dtype
                   and h.device == yi.device for h, yi in zip(hys, y))
        return hys, good

    def __call__(self, s: Tensor, y: Tensor, hy: HyFn, mu2: float) -> DampingResult:
        hys, good = self._hys([hy], [y])
        if not good or not _batchable([s], [y], [mu2]):
            return self._single(s, y, hys[0], mu2)
        w, res = self._run([s], [y], hys, [mu2], "call")
        act = {k: v.reshape(()) if v.dim() else v for k, v in res.active.items()}
        return DampingResult(w.out_views[0].clone(), w.out2_views[0].clone(),
                             {k: v.clone() for k, v in act.items()}, res.ok.reshape(()).clone())

    def many(self, s: Sequence[Tensor], y: Sequence[Tensor], hy: Sequence[HyFn],
             mu2: Sequence[float]) -> list[DampingResult]:
        s, y, mu2 = list(s), list(y), list(mu2)
        self.last_flat = None
        if not _batchable(s, y, mu2) or len(hy) != len(s):
            return Damping.many(self, s, y, hy, mu2)
        hys, good = self._hys(hy, y)
        if not good:
            return Damping.many(self, s, y, [lambda v, h=h: h for h in hys], mu2)
        w, res = self._run(s, y, hys, mu2, "many")
        #: the flat outcome of this call (``so``: each layer's damped s^T y), for statistics
        self.last_flat = res
        oks = res.ok.unbind()
        acts = {k: (v.unbind() if v.dim() else [v] * len(oks)) for k, v in res.active.items()}
        return [DampingResult(si, yi, {k: v[i] for k, v in acts.items()}, o)
                for i, (si, yi, o) in enumerate(zip(w.out_views, w.out2_views, oks))]

    def finish_active(self, res: Flat) -> dict[str, Tensor]:
        """The activations as the per-layer rule reports them (``flat`` leaves this step to
        the caller, who may do it when the figures are read)."""
        return res.active

    def flat(self, w: Work, mu2: Sequence[float]) -> Flat:
        """Damp the pairs in rows s, y of ``w`` (H y in row hy) for all layers; the damped
        pair is left in rows out, out2, NOT zeroed where not ok (the caller selects), the
        activations unfinished (:meth:`finish_active`)."""
        if self._y_in_out2:
            w.out2.copy_(w.y)
        return self._flat(w, mu2)


def powell(s: Tensor, y: Tensor, hy: Tensor, mu1: float) -> tuple[Tensor, Tensor]:
    """If s^T y <= mu1 y^T H y: theta = (1-mu1) y^T H y / (y^T H y - s^T y),
    s <- theta s + (1-theta) H y, so that afterwards s^T y = mu1 y^T H y. (A pair that cannot
    meet this in floating point comes back with s = 0; :class:`PowellDamping` reports it.)"""
    out, active, ok = _powell(s, y, hy, mu1)
    return torch.where(ok, out, const(0.0, out.dtype, out.device)), active


def powell_identity(s: Tensor, y: Tensor, mu2: float) -> tuple[Tensor, Tensor]:
    """Powell with B = I: if s^T y <= mu2 s^T s: theta2 = (1-mu2) s^T s / (s^T s - s^T y),
    y <- theta2 y + (1-theta2) s, so that afterwards s^T y = mu2 s^T s. (A pair that cannot
    meet this comes back with y = 0.)"""
    out, active, ok = _powell_identity(s, y, mu2)
    return torch.where(ok, out, const(0.0, out.dtype, out.device)), active


@register('damping')
class NoDamping(Damping):
    name = "none"
    description = "no damping: the pair is used as it is"

    def __call__(self, s: Tensor, y: Tensor, hy: HyFn, mu2: float) -> DampingResult:
        return DampingResult(s, y)


@register('damping')
class PowellDamping(_FlatRule, Damping):
    name = "powell"
    description = "Powell damping on H (mu1 = 0.2): s^T y >= mu1 y^T H y afterwards"
    options = MU1
    _y_in_out2 = True

    def _single(self, s: Tensor, y: Tensor, hy: Tensor, mu2: float) -> DampingResult:
        """One layer outside the flat path (other dtypes, H y not a plain vector)."""
        s, act, ok = _powell(s, y, hy, self.opts.get("mu1", 0.2))
        s, y = _zero_unless(ok, s, y)
        return DampingResult(s, y, {"powell": act}, ok)

    def _flat(self, w: Work, mu2: Sequence[float]) -> Flat:
        return _flat_powell_only(w, self.opts.get("mu1", 0.2), mu2)

    def guarantee(self, s: Tensor, y: Tensor, hy: HyFn, mu2: float) -> Tensor:
        yhy = torch.dot(y, hy(y))
        return _at_least(torch.dot(s, y), self.opts.get("mu1", 0.2) * yhy,
                         postcondition_rtol(s.dtype))


class _PowellThenSecond(PowellDamping):
    """Powell on H, then a second stage that guarantees s^T y >= mu2 s^T s."""

    _y_in_out2 = False

    def guarantee(self, s: Tensor, y: Tensor, hy: HyFn, mu2: float) -> Tensor:
        return _at_least(torch.dot(s, y), mu2 * torch.dot(s, s), postcondition_rtol(s.dtype))


@register('damping')
class DoubleDamping(_PowellThenSecond):
    name = "dd"
    description = "double damping [P2]: Powell on H, then Powell with B = I and mu2 = sqrt(lambda)"

    def _single(self, s: Tensor, y: Tensor, hy: Tensor, mu2: float) -> DampingResult:
        s, act1, ok1 = _powell(s, y, hy, self.opts.get("mu1", 0.2))
        s, y = _zero_unless(ok1, s, y)
        y, act2, ok2 = _powell_identity(s, y, mu2)
        ok = ok1 & ok2
        s, y = _zero_unless(ok, s, y)
        return DampingResult(s, y, {"powell": act1, "second": act2}, ok)

    def _flat(self, w: Work, mu2: Sequence[float]) -> Flat:
        return _flat_dd(w, self.opts.get("mu1", 0.2), mu2)

    def finish_active(self, res: Flat) -> dict[str, Tensor]:
        # the second stage of a pair Powell could not damp runs on (0, 0): active
        act = dict(res.active)
        act["second"] = torch.where(res.ok1, act["second"],
                                    const(True, torch.bool, res.ok1.device))
        return act


@register('damping')
class DDV2Damping(_PowellThenSecond):
    name = "ddv2"
    description = "DDV2 [P1] (R): Powell on H, then Levenberg-Marquardt y <- y + mu2 s"

    def _single(self, s: Tensor, y: Tensor, hy: Tensor, mu2: float) -> DampingResult:
        s, act1, ok1 = _powell(s, y, hy, self.opts.get("mu1", 0.2))
        s, y = _zero_unless(ok1, s, y)
        y = y + mu2 * s
        ok2 = finite_exact(y) & _at_least(torch.dot(s, y), mu2 * torch.dot(s, s),
                                          postcondition_rtol(s.dtype))
        ok = ok1 & ok2
        s, y = _zero_unless(ok, s, y)
        return DampingResult(s, y, {"powell": act1, "second": const(True, torch.bool, act1.device)}, ok)

    def _flat(self, w: Work, mu2: Sequence[float]) -> Flat:
        return _flat_ddv2(w, self.opts.get("mu1", 0.2), mu2)
