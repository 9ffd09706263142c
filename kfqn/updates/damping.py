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

from typing import Callable

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
