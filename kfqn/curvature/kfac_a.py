"""K-FAC's A side: EMA of the input second moment, damped inverse on a cadence (docs/algorithms.md §4).

A = (1/m) sum_i sum_t abar_{i,t} abar_{i,t}^T (summed over positions t for Conv2d, docs/algorithms.md §2;
Grosse & Martens, *KFC*, ICML 2016, eq. 24), averaged by an EMA every T1 steps and warm-started
by a forward-only pass over the data (``opt.warm_start()``; iteration 0 then uses the warm-start
A as it is, as docs/algorithms.md §3 prescribes for P2's A factors). H_a = (A + gamma_A I)^{-1} every T2 steps
(and every step for the first ``inverse_warmup``), gamma_A = sqrt(lambda) (or the pi-split).
Cadences, damping and inversion: :mod:`kfqn.curvature.kfac_factor`.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from kfqn.core.components import Option
from kfqn.curvature.base import AEstimator, LayerContext, StepInfo, WarmStartSum
from kfqn.curvature.kfac_factor import CADENCE_OPTIONS, KFACFactorMixin
from kfqn.layers.capture import Capture


class KFACA(KFACFactorMixin, AEstimator):
    name = "kfac"
    description = "K-FAC A side: EMA of abar abar^T (warm start), (A + gamma I)^-1 every T2 steps"
    options = {
        **CADENCE_OPTIONS,
        "warm_start": Option(True, "initialise A by a forward-only pass over the data "
                             "(opt.warm_start()); otherwise from the first batch", type=bool),
    }
    subcomponents = {"inversion": "inversion"}
    side, factor_key, inverse_key = "a", "A", "H_a"

    def __init__(self, ctx: LayerContext, options: Mapping[str, Any]) -> None:
        super().__init__(ctx, options)
        self._init_factor(ctx.adapter.d_a)
        self.needs_warm_start = bool(self.opts["warm_start"])
        #: device flag: the next accepted statistics step keeps the warm-start A as it is
        self._skip_next_ema = torch.zeros((), dtype=torch.bool, device=ctx.device)
        self._warm = WarmStartSum()

    def _cov(self, inp: Tensor) -> Tensor:
        return self.ctx.adapter.input_covariance(inp).to(self.ctx.dtype)

    # -- warm start ---------------------------------------------------------------------------
    def warm_accumulate(self, inp: Tensor) -> None:
        self._warm.add(self._cov(inp), inp.shape[0])

    def warm_finish(self, lam_a: float) -> None:
        a = self._warm.mean()
        if a is None:
            return
        self._set_factor(a)
        self._skip_next_ema = torch.ones((), dtype=torch.bool, device=self.ctx.device)

    # -- per step ------------------------------------------------------------------------------
    def prepare(self, cap: Capture, info: StepInfo) -> None:
        if self.stats_due(info.step):
            skip = self._skip_next_ema
            self._skip_next_ema = skip & ~info.ok   # consumed by an accepted step only
            self._absorb(self._cov(cap.inp), info.ok, skip_ema=skip)
        self._schedule_inverse(info.step, info.lam_a)

    def apply(self, m: Tensor) -> Tensor:
        return m @ self._inverse_or_identity() if self.opts["precondition"] else m

    def state_dict(self) -> dict[str, Any]:
        return {**self._factor_state(), "skip_next_ema": self._skip_next_ema}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_factor_state(state)
        self._skip_next_ema = torch.as_tensor(state["skip_next_ema"]).to(self.ctx.device,
                                                                          torch.bool).clone()
