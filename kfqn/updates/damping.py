"""Damping of secant pairs (SPEC §3): none, Powell, double damping DD [P2], DDV2 [P1].

Damping acts on the inverse approximation H: Powell's rule with the roles of s and y swapped.
All branches are ``torch.where`` selections, so no host synchronisation happens.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from kfqn.core.components import Option
from kfqn.updates.base import Damping, DampingResult

HyFn = Callable[[Tensor], Tensor]
MU1 = {"mu1": Option(0.2, "Powell constant mu1", type=float, low=0.0, high=1.0,
                     open_low=True, open_high=True)}


def _safe(den: Tensor, use: Tensor) -> Tensor:
    return torch.where(use, den, torch.ones_like(den))


def powell(s: Tensor, y: Tensor, hy: Tensor, mu1: float) -> tuple[Tensor, Tensor]:
    """If s^T y < mu1 y^T H y: theta = (1-mu1) y^T H y / (y^T H y - s^T y),
    s <- theta s + (1-theta) H y, so that afterwards s^T y = mu1 y^T H y."""
    yhy = torch.dot(y, hy)
    sy = torch.dot(s, y)
    active = sy < mu1 * yhy
    theta = (1.0 - mu1) * yhy / _safe(yhy - sy, active)
    return torch.where(active, theta * s + (1.0 - theta) * hy, s), active


def powell_identity(s: Tensor, y: Tensor, mu2: float) -> tuple[Tensor, Tensor]:
    """Powell with B = I: if s^T y < mu2 s^T s: theta2 = (1-mu2) s^T s / (s^T s - s^T y),
    y <- theta2 y + (1-theta2) s, so that afterwards s^T y = mu2 s^T s."""
    ss = torch.dot(s, s)
    sy = torch.dot(s, y)
    active = sy < mu2 * ss
    theta = (1.0 - mu2) * ss / _safe(ss - sy, active)
    return torch.where(active, theta * y + (1.0 - theta) * s, y), active


class NoDamping(Damping):
    name = "none"
    description = "no damping: the pair is used as it is"

    def __call__(self, s: Tensor, y: Tensor, hy: HyFn, mu2: float) -> DampingResult:
        return DampingResult(s, y)


class PowellDamping(Damping):
    name = "powell"
    description = "Powell damping on H (mu1 = 0.2): s^T y >= mu1 y^T H y afterwards"
    options = MU1

    def __call__(self, s: Tensor, y: Tensor, hy: HyFn, mu2: float) -> DampingResult:
        s, act = powell(s, y, hy(y), self.opts.get("mu1", 0.2))
        return DampingResult(s, y, {"powell": act})

    def guarantee(self, s: Tensor, y: Tensor, hy: HyFn, mu2: float) -> Tensor:
        yhy = torch.dot(y, hy(y))
        return torch.dot(s, y) >= self.opts.get("mu1", 0.2) * yhy * (1 - 1e-9) - 1e-12


class _PowellThenSecond(PowellDamping):
    """Powell on H, then a second stage that guarantees s^T y >= mu2 s^T s."""

    def guarantee(self, s: Tensor, y: Tensor, hy: HyFn, mu2: float) -> Tensor:
        return torch.dot(s, y) >= mu2 * torch.dot(s, s) * (1 - 1e-9) - 1e-12


class DoubleDamping(_PowellThenSecond):
    name = "dd"
    description = "double damping [P2]: Powell on H, then Powell with B = I and mu2 = sqrt(lambda)"

    def __call__(self, s: Tensor, y: Tensor, hy: HyFn, mu2: float) -> DampingResult:
        s, act1 = powell(s, y, hy(y), self.opts.get("mu1", 0.2))
        y, act2 = powell_identity(s, y, mu2)
        return DampingResult(s, y, {"powell": act1, "second": act2})


class DDV2Damping(_PowellThenSecond):
    name = "ddv2"
    description = "DDV2 [P1] (R): Powell on H, then Levenberg-Marquardt y <- y + mu2 s"

    def __call__(self, s: Tensor, y: Tensor, hy: HyFn, mu2: float) -> DampingResult:
        s, act1 = powell(s, y, hy(y), self.opts.get("mu1", 0.2))
        y = y + mu2 * s
        return DampingResult(s, y, {"powell": act1, "second": torch.ones_like(act1)})
