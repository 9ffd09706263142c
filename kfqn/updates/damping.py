"""Damping of secant pairs (docs/algorithms.md §3): none, Powell, double damping DD [P2], DDV2 [P1].

Damping acts on the inverse approximation H: Powell's rule with the roles of s and y swapped.
All branches are ``torch.where`` selections, so no host synchronisation happens.

Comparisons are non-strict, as in [P2 code]: Powell fires when s^T y <= mu1 y^T H y, DD's
second stage when s^T y / s^T s <= mu2.

Floating point. The mixing coefficients are computed by the textbook formulas where those are
finite (and, for Powell, in [0, 1]); otherwise from the ratios r = s^T y / y^T H y and
q = s^T y / s^T s, theta = (1 - mu1) / (1 - r) and theta2 = (1 - mu2) / (1 - q), which do not
overflow. Every rule then checks its postcondition on the pair it computed, within the relative
tolerance :func:`~kfqn.updates.base.postcondition_rtol` (1e-4 in float32, 1e-10 in float64):
a pair that misses it, is not finite, or has no damped pair at all (DD with mu2 != 1 and
s^T y = s^T s: no theta2 moves s^T y) comes back as s = y = 0 with ``ok`` false in the
:class:`~kfqn.updates.base.DampingResult`, so that every update rule rejects it (s^T y = 0).
For finite input the output is always finite.
"""
from __future__ import annotations

from typing import Callable, Sequence

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


def _finite(*ts: Tensor) -> Tensor:
    """0-dim bool: every entry finite (exact; these are vectors and scalars)."""
    return finite_exact(ts[0] if len(ts) == 1 else torch.cat([t.reshape(-1) for t in ts]))


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


# -- several layers at one call (Damping.many) -------------------------------------------------
# The loop's dot products are made per layer on operands of the same values and the same kind of
# storage (the caller's tensors, or fresh ones), so they round alike; everything elementwise
# runs once, on (L,) vectors of the layers' scalars or on the layers' vectors concatenated, and
# the finiteness tests (exact: a sum of zeros, NaN where an entry is not finite) per layer by one
# index_add. Damped vectors that feed a dot product are copied out of the concatenation first
# (fresh tensors, as the loop's are).

#: (dims, device) -> the layer of each entry of the concatenated vectors (read-only)
_SEGS: dict = {}
#: (mu2 values, dtype, device) -> (mu2, 1 - mu2) as (L,) tensors (read-only)
_MU2S: dict = {}


def _seg(dims: tuple[int, ...], device: torch.device) -> Tensor:
    key = (dims, device)
    t = _SEGS.get(key)
    if t is None:
        with torch.inference_mode(False):
            t = torch.cat([torch.full((d,), i, dtype=torch.long) for i, d in enumerate(dims)]
                          ).to(device)
        if len(_SEGS) > 256:
            _SEGS.clear()
        _SEGS[key] = t
    return t


def _mu2s(mu2: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """mu2 and 1 - mu2 (the latter computed in Python, as the loop's ``1.0 - mu2``), in dtype."""
    key = (tuple(float(m).hex() for m in mu2), dtype, device)
    t = _MU2S.get(key)
    if t is None:
        with torch.inference_mode(False):
            t = torch.tensor([list(mu2), [1.0 - m for m in mu2]], dtype=dtype, device=device).unbind()
        if len(_MU2S) > 256:
            _MU2S.clear()
        _MU2S[key] = t
    return t


def _finite_many(cat: Tensor, seg: Tensor, n: int) -> Tensor:
    """(L,) bool: ``finite_exact`` of each layer's segment of ``cat``."""
    return cat.new_zeros(n).index_add_(0, seg, cat * 0) == 0


def _fresh(cat: Tensor, dims: list[int]) -> list[Tensor]:
    return [t.clone() for t in cat.split(dims)]


def _batchable(s, y, mu2) -> bool:
    """Layers the batched path takes: >= 2, 1-D s and y of one dtype and device, float mu2."""
    if len(s) < 2 or len(s) != len(y) or len(s) != len(mu2):
        return False
    dt, dev = s[0].dtype, s[0].device
    return (dt in (torch.float32, torch.float64)
            and all(isinstance(m, (float, int)) and not isinstance(m, bool) for m in mu2)
            and all(isinstance(t, Tensor) and t.dim() == 1 and t.dtype == dt and t.device == dev
                    for t in (*s, *y))
            and all(a.shape == b.shape for a, b in zip(s, y)))


def _powell_many(s: list[Tensor], y: list[Tensor], hy: list[Tensor], mu1: float):
    """:func:`_powell` of each layer: (out_cat, outs, active, ok, out^T y, seg, dims) with
    ``outs`` the damped s as fresh tensors, ``active`` and ``ok`` (L,) bool."""
    n = len(s)
    dtype, device = s[0].dtype, s[0].device
    dims = [t.shape[0] for t in s]
    seg = _seg(tuple(dims), device)
    yhy = torch.stack([torch.dot(yi, hi) for yi, hi in zip(y, hy)])
    sy = torch.stack([torch.dot(si, yi) for si, yi in zip(s, y)])
    target = mu1 * yhy
    active = sy <= target
    theta = (1.0 - mu1) * yhy / _safe(yhy - sy, active)
    pos = yhy > 0
    r = sy / _safe(yhy, pos)
    stable = torch.where(pos, (1.0 - mu1) / (1.0 - r), const(0.0, dtype, device))
    textbook = theta.clamp(0.0, 1.0) == theta
    theta = torch.where(textbook, theta, stable)
    s_cat = torch.cat(s)
    out_cat = torch.where(active[seg], theta[seg] * s_cat + (1.0 - theta)[seg] * torch.cat(hy),
                          s_cat)
    outs = _fresh(out_cat, dims)
    oy = torch.stack([torch.dot(o, yi) for o, yi in zip(outs, y)])
    ok = _finite_many(out_cat, seg, n) & _at_least(oy, target, postcondition_rtol(dtype))
    return out_cat, outs, active, ok, seg, dims


def _results(s_out: list[Tensor], y_out: list[Tensor], ok: Tensor,
             active: dict[str, Tensor]) -> list[DampingResult]:
    """Per layer DampingResult(where(ok, s, 0), where(ok, y, 0), active, ok)."""
    zero = const(0.0, s_out[0].dtype, s_out[0].device)
    oks = ok.unbind()
    acts = {k: (v.unbind() if v.dim() else [v] * len(oks)) for k, v in active.items()}
    return [DampingResult(torch.where(o, si, zero), torch.where(o, yi, zero),
                          {k: v[i] for k, v in acts.items()}, o)
            for i, (si, yi, o) in enumerate(zip(s_out, y_out, oks))]


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
class PowellDamping(Damping):
    name = "powell"
    description = "Powell damping on H (mu1 = 0.2): s^T y >= mu1 y^T H y afterwards"
    options = MU1

    def __call__(self, s: Tensor, y: Tensor, hy: HyFn, mu2: float) -> DampingResult:
        s, act, ok = _powell(s, y, hy(y), self.opts.get("mu1", 0.2))
        s, y = _zero_unless(ok, s, y)
        return DampingResult(s, y, {"powell": act}, ok)

    def many(self, s: Sequence[Tensor], y: Sequence[Tensor], hy: Sequence[HyFn],
             mu2: Sequence[float]) -> list[DampingResult]:
        s, y, mu2 = list(s), list(y), list(mu2)
        if not _batchable(s, y, mu2) or len(hy) != len(s):
            return super().many(s, y, hy, mu2)
        hys = [h(yi) for h, yi in zip(hy, y)]
        if not all(isinstance(h, Tensor) and h.shape == yi.shape and h.dtype == yi.dtype
                   and h.device == yi.device for h, yi in zip(hys, y)):
            return super().many(s, y, [lambda v, h=h: h for h in hys], mu2)
        return self._many(s, y, hys, mu2)

    def _many(self, s: list[Tensor], y: list[Tensor], hy: list[Tensor],
              mu2: list[float]) -> list[DampingResult]:
        """:meth:`many` of >= 2 layers of one dtype and device, H y given."""
        _, outs, act, ok, _, _ = _powell_many(s, y, hy, self.opts.get("mu1", 0.2))
        return _results(outs, y, ok, {"powell": act})

    def guarantee(self, s: Tensor, y: Tensor, hy: HyFn, mu2: float) -> Tensor:
        yhy = torch.dot(y, hy(y))
        return _at_least(torch.dot(s, y), self.opts.get("mu1", 0.2) * yhy,
                         postcondition_rtol(s.dtype))


class _PowellThenSecond(PowellDamping):
    """Powell on H, then a second stage that guarantees s^T y >= mu2 s^T s."""

    def guarantee(self, s: Tensor, y: Tensor, hy: HyFn, mu2: float) -> Tensor:
        return _at_least(torch.dot(s, y), mu2 * torch.dot(s, s), postcondition_rtol(s.dtype))


@register('damping')
class DoubleDamping(_PowellThenSecond):
    name = "dd"
    description = "double damping [P2]: Powell on H, then Powell with B = I and mu2 = sqrt(lambda)"

    def __call__(self, s: Tensor, y: Tensor, hy: HyFn, mu2: float) -> DampingResult:
        s, act1, ok1 = _powell(s, y, hy(y), self.opts.get("mu1", 0.2))
        s, y = _zero_unless(ok1, s, y)
        y, act2, ok2 = _powell_identity(s, y, mu2)
        ok = ok1 & ok2
        s, y = _zero_unless(ok, s, y)
        return DampingResult(s, y, {"powell": act1, "second": act2}, ok)

    def _many(self, s: list[Tensor], y: list[Tensor], hy: list[Tensor],
              mu2: list[float]) -> list[DampingResult]:
        out_cat, outs, act1, ok1, seg, dims = _powell_many(s, y, hy, self.opts.get("mu1", 0.2))
        dtype, device = out_cat.dtype, out_cat.device
        zero = const(0.0, dtype, device)
        # the second stage on s1 = where(ok1, s, 0), y1 = where(ok1, y, 0): s1 is outs where
        # ok1; where not, s1 = y1 = 0 give s1^T s1 = s1^T y1 = +0 and the pair is zeroed anyway
        y1 = [torch.where(o, yi, zero) for o, yi in zip(ok1.unbind(), y)]
        ss = torch.where(ok1, torch.stack([torch.dot(o, o) for o in outs]), zero)
        sy = torch.where(ok1, torch.stack([torch.dot(o, yi) for o, yi in zip(outs, y1)]), zero)
        m2, one_m2 = _mu2s(tuple(mu2), dtype, device)
        target = m2 * ss
        active = sy <= target
        theta = one_m2 * ss / _safe(ss - sy, active)
        pos = ss > 0
        q = sy / _safe(ss, pos)
        stable = torch.reciprocal(1.0 - q) * one_m2          # (1.0 - mu2) / (1.0 - q), as torch does
        stable = torch.where(pos, stable, const(1.0, dtype, device))
        theta = torch.where(finite_scalar(theta), theta, stable)
        y_cat = torch.cat(y)
        out2_cat = torch.where(active[seg], theta[seg] * y_cat + (1.0 - theta)[seg] * out_cat, y_cat)
        outs2 = _fresh(out2_cat, dims)
        so = torch.stack([torch.dot(o, o2) for o, o2 in zip(outs, outs2)])
        ok2 = _finite_many(out2_cat, seg, len(outs)) & _at_least(so, target, postcondition_rtol(dtype))
        return _results(outs, outs2, ok1 & ok2, {"powell": act1, "second": active})


@register('damping')
class DDV2Damping(_PowellThenSecond):
    name = "ddv2"
    description = "DDV2 [P1] (R): Powell on H, then Levenberg-Marquardt y <- y + mu2 s"

    def __call__(self, s: Tensor, y: Tensor, hy: HyFn, mu2: float) -> DampingResult:
        s, act1, ok1 = _powell(s, y, hy(y), self.opts.get("mu1", 0.2))
        s, y = _zero_unless(ok1, s, y)
        y = y + mu2 * s
        ok2 = finite_exact(y) & _at_least(torch.dot(s, y), mu2 * torch.dot(s, s),
                                          postcondition_rtol(s.dtype))
        ok = ok1 & ok2
        s, y = _zero_unless(ok, s, y)
        return DampingResult(s, y, {"powell": act1, "second": const(True, torch.bool, act1.device)}, ok)

    def _many(self, s: list[Tensor], y: list[Tensor], hy: list[Tensor],
              mu2: list[float]) -> list[DampingResult]:
        out_cat, outs, act1, ok1, seg, dims = _powell_many(s, y, hy, self.opts.get("mu1", 0.2))
        dtype, device = out_cat.dtype, out_cat.device
        m2, _ = _mu2s(tuple(mu2), dtype, device)
        # y1 + mu2 s1 with s1, y1 the Powell pair zeroed where not ok1: equal to y + mu2 s
        # where ok1, and the pair is zeroed where not
        y2_cat = torch.cat(y) + m2[seg] * out_cat
        outs2 = _fresh(y2_cat, dims)
        so = torch.stack([torch.dot(o, o2) for o, o2 in zip(outs, outs2)])
        ss = torch.stack([torch.dot(o, o) for o in outs])
        ok2 = _finite_many(y2_cat, seg, len(outs)) & _at_least(so, m2 * ss, postcondition_rtol(dtype))
        return _results(outs, outs2, ok1 & ok2,
                        {"powell": act1, "second": const(True, torch.bool, act1.device)})
