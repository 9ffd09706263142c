"""Shampoo as one preconditioner per layer (docs/algorithms.md §4; Gupta, Koren, Singer, *Shampoo: Preconditioned
Stochastic Tensor Optimization*, ICML 2018, Algorithm 1 for matrices).

With Mbar the homogeneous gradient (d_g x d_a) of the current step:

    L <- L + Mbar^T Mbar          (d_a x d_a),   H_a = (L + eps I)^{-1/4}
    R <- R + Mbar Mbar^T          (d_g x d_g),   H_g = (R + eps I)^{-1/4}
    P = -H_g Mhat H_a

(``beta`` < 1 turns the sums into EMAs started at the first statistic.) Statistics every T1
steps, inverse roots by eigendecomposition every T2 steps and every step for the first
``inverse_warmup``; the layer's lambda is not used, ``epsilon`` is Shampoo's own. ``root`` is
the order of the root (4 for the two factors of a matrix).

Grafting (``grafting: sgd``; Agarwal et al., *Disentangling adaptive gradient methods from
learning rates*, 2020): each layer's direction is rescaled to the norm of the momentum direction
Mhat, so Shampoo chooses the direction and SGD-momentum the step length:
P = -(H_g Mhat H_a) ||Mhat|| / ||H_g Mhat H_a||.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from kfqn.core.components import Option, register
from kfqn.core.sections import Sub
from kfqn.curvature.base import LayerContext, StepInfo
from kfqn.layers.capture import Capture
from kfqn.preconditioners.base import TwoSidedPreconditioner

OPTIONS: dict[str, Option | Sub] = {
    "beta": Option(1.0, "1 = running sum (Shampoo); < 1 = EMA with this decay", type=float,
                   low=0.0, high=1.0, open_low=True),
    "epsilon": Option(1.0e-4, "eps: the roots are of (statistic + eps I)", type=float, low=0.0,
                      open_low=True),
    "root": Option(4, "p of the inverse p-th root (4 for a matrix's two factors)", type=int, low=1),
    "stats_every": Option(1, "T1: update the statistic every T1 steps", type=int, low=1),
    "inverse_every": Option(20, "T2: recompute the inverse root every T2 steps", type=int, low=1),
    "inverse_warmup": Option(20, "also at every step k < this", type=int, low=0),
    "precondition": Option(True, "false: H = I while statistics are still kept (preconditioning "
                           "switched off)", type=bool),
    "inversion": Sub("inversion", "eigh", "strategy whose invert_root computes the roots"),
    "grafting": Option("sgd", "'sgd': rescale each layer's direction to the norm of the "
                       "momentum direction (learning-rate grafting); 'none'",
                       choices=["none", "sgd"]),
}


class _Side:
    """Statistic, cadence and inverse root of one side ('a': L from Mbar^T Mbar, d_a x d_a;
    'g': R from Mbar Mbar^T, d_g x d_g)."""

    def __init__(self, ctx: LayerContext, opts: dict, side: str, stats: dict) -> None:
        self.ctx, self.opts, self.side, self._stats = ctx, opts, side, stats
        self.factor_key, self.inverse_key = ("A", "H_a") if side == "a" else ("G", "H_g")
        dim = ctx.adapter.d_a if side == "a" else ctx.adapter.d_g
        dt, dev = self.ctx.dtype, self.ctx.device
        self.dim = dim
        self.inversion = self.ctx.inversion(self.opts["inversion"])
        self.stat = torch.zeros(dim, dim, dtype=dt, device=dev)
        self.seen = torch.zeros((), dtype=torch.bool, device=dev)
        self.root_inv: Tensor | None = None
        #: accepted statistics updates (device; a skipped step leaves it alone)
        self.updates = torch.zeros((), dtype=torch.long, device=dev)
        self._tried = False  # host: statistics were attempted once (the first step always is)
        self.inversions = 0

    def _outer(self, mbar: Tensor) -> Tensor:
        return mbar.T @ mbar if self.side == "a" else mbar @ mbar.T

    def prepare(self, cap: Capture, info: StepInfo) -> None:
        step = info.step
        if step % self.opts["stats_every"] == 0 or not self._tried:
            self._tried = True
            mbar = self.ctx.adapter.homogeneous_grad().to(self.ctx.dtype)
            outer = self._outer(mbar)
            good = info.ok & torch.isfinite(outer).all()
            beta = self.opts["beta"]
            new = self.stat + outer if beta == 1.0 else torch.where(
                self.seen, beta * self.stat + (1.0 - beta) * outer, outer)
            self.stat.copy_(torch.where(good, new, self.stat))    # in place: static addresses
            self.seen |= good
            self.updates += good.long()
        due = (self.root_inv is None or step < self.opts["inverse_warmup"]
               or step % self.opts["inverse_every"] == 0)
        if self.opts["precondition"] and due:
            res = self.inversion.invert_root(self.stat, self.opts["epsilon"], self.opts["root"])
            if self.root_inv is None:
                self.root_inv = res.inverse
            else:
                self.root_inv.copy_(res.inverse)   # in place: static addresses
            self.inversions += 1
            self._stats[f"{self.side}_inversion_fallback"] = res.fallback

    def _h(self) -> Tensor:
        if self.root_inv is None:
            return torch.eye(self.dim, dtype=self.ctx.dtype, device=self.ctx.device)
        return self.root_inv

    def factors(self) -> dict[str, Tensor]:
        return {self.factor_key: self.stat.clone(), self.inverse_key: self._h().clone()}

    def state_dict(self) -> dict[str, Any]:
        return {"stat": self.stat, "seen": self.seen, "root_inv": self.root_inv,
                "updates": self.updates, "inversions": self.inversions}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        dev, dt = self.ctx.device, self.ctx.dtype
        self.stat = state["stat"].to(dev, dt).clone()
        self.seen = state["seen"].to(dev).clone()
        r = state["root_inv"]
        self.root_inv = None if r is None else r.to(dev, dt).clone()
        self.updates = torch.as_tensor(state["updates"]).to(dev, torch.long).clone()
        self._tried = True
        self.inversions = int(state["inversions"])


@register("preconditioner")
class ShampooPreconditioner(TwoSidedPreconditioner):
    name = "shampoo"
    description = ("Shampoo [Gupta et al. 2018]: (sum Mbar Mbar^T + eps I)^(-1/4) Mhat "
                   "(sum Mbar^T Mbar + eps I)^(-1/4), SGD grafting")
    options = OPTIONS
    #: its statistics come from the gradient, which DDP has averaged: nothing to declare
    owner_placement = True

    def supports_owner_placement(self) -> bool:
        return True

    def batch_means(self, phase: str, step: int) -> dict[str, Any]:
        return {}

    def __init__(self, ctx: LayerContext, options: Mapping[str, Any],
                 config: Mapping[str, Any]) -> None:
        super().__init__(ctx, options, config)
        self._stats: dict[str, Tensor] = {}
        self.a = _Side(ctx, self.opts, "a", self._stats)
        self.g = _Side(ctx, self.opts, "g", self._stats)

    def precondition_t(self, mt: Tensor) -> Tensor:
        m = mt.T
        if not self.opts["precondition"]:
            return mt
        out = (self.g._h() @ m) @ self.a._h()
        if self.opts["grafting"] == "sgd":
            ref = torch.linalg.vector_norm(m)
            norm = torch.linalg.vector_norm(out)
            out = out * torch.where(norm > 0, ref / torch.where(norm > 0, norm, 1.0), 1.0)
        return out.T

    def stats(self) -> dict[str, Tensor]:
        return dict(self._stats)
