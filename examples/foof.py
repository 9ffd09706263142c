"""Example plugin: a new preconditioner family in one file (README, "Write a plugin").

FOOF (Benzing, *Gradient descent on neurons and its link to approximate second-order
optimization*, ICML 2022) preconditions only the input side::

    A <- beta A + (1 - beta) (1/m) sum_i sum_t abar_{i,t} abar_{i,t}^T
    P = -Mhat (A + lambda I)^{-1}

Use it with ``plugins: [foof]`` in a config (this folder on PYTHONPATH), or::

    import kfqn, foof
    kfqn.register_plugin(foof)
    opt = kfqn.build_optimizer(model, {"preconditioner": "foof", "lr": 0.1})
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

import kfqn
from kfqn.curvature.base import input_means
from kfqn.preconditioners.base import LayerPreconditioner


@kfqn.register("preconditioner")
class FOOF(LayerPreconditioner):
    name = "foof"
    description = "FOOF [Benzing 2022]: Mhat (A + lambda I)^-1, A = EMA of abar abar^T"
    options = {
        "beta": kfqn.Option(0.95, "EMA decay of A", float, low=0.0, high=1.0, open_high=True),
        "inverse_every": kfqn.Option(10, "recompute the inverse every this many steps", int,
                                     low=1),
    }

    def __init__(self, ctx, options: Mapping[str, Any], config: Mapping[str, Any]) -> None:
        super().__init__(ctx, options, config)
        d = ctx.adapter.d_a
        self.a = torch.zeros(d, d, dtype=ctx.dtype, device=ctx.device)
        self.h_a = torch.eye(d, dtype=ctx.dtype, device=ctx.device)
        self.seen = torch.zeros((), dtype=torch.bool, device=ctx.device)

    # data-parallel: the batch statistic it averages over the ranks, declared so that one
    # all-reduce carries it with every other layer's; then placement=owner can run it too
    owner_placement = True

    def batch_means(self, phase: str, step: int) -> dict:
        return input_means("input_covariance") if phase == "current" else {}

    def prepare(self, stats, info) -> None:
        batch = self.ctx.adapter.input_covariance(stats.current.inp).to(self.ctx.dtype)
        beta = self.opts["beta"]
        new = torch.where(self.seen, beta * self.a + (1 - beta) * batch, batch)
        good = info.ok & torch.isfinite(batch).all()       # a skipped step changes nothing
        self.a = torch.where(good, new, self.a)
        self.seen = self.seen | good
        if info.step % self.opts["inverse_every"] == 0:
            lam = info.lam_a * info.mu2                    # the layer's lambda
            eye = torch.eye(self.a.shape[0], dtype=self.a.dtype, device=self.a.device)
            self.h_a = torch.linalg.inv(self.a + lam * eye)

    def precondition_t(self, mt: Tensor) -> Tensor:
        return self.h_a @ mt                               # (Mhat H_a)^T = H_a Mhat^T

    def factors(self) -> dict[str, Tensor]:
        return {"A": self.a.clone(), "H_a": self.h_a.clone()}

    def state_dict(self) -> dict[str, Any]:
        return {"a": self.a, "h_a": self.h_a, "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.a = state["a"].to(self.a).clone()
        self.h_a = state["h_a"].to(self.h_a).clone()
        self.seen = state["seen"].to(self.seen.device).clone()
