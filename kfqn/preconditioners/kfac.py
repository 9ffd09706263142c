"""K-FAC (docs/algorithms.md §4; Martens & Grosse, ICML 2015; Grosse & Martens, *KFC*, ICML 2016
for Conv2d): one preconditioner per layer owning both EMA factors, their damped inverses, the
pi-split of the damping and the sampled Fisher.

* A = EMA of (1/m) sum_i sum_t abar_{i,t} abar_{i,t}^T (summed over positions for Conv2d), warm
  started by a forward-only pass (``opt.warm_start()``; iteration 0 then keeps the warm-start A,
  as for P2's A factors);
* G = EMA of (1/(m |T|)) sum_i sum_t g_{i,t} g_{i,t}^T with g from

  - ``fisher: sampled`` (default): labels drawn from the model's predictive distribution -- the
    true Fisher (Martens & Grosse 2015, §5); ``samples`` draws per datum;
  - ``fisher: empirical``: the true labels, i.e. the gradients of the user's own backward;
  - ``fisher: exact``: every column of the square root of the output Hessian -- the exact
    Fisher = GGN for these losses (Botev et al., ICML 2017, "KFLR"; R backward passes).

  The sampled and exact variants need no second closure call: the optimizer backpropagates
  :meth:`KFACPreconditioner.output_cotangents` from the model output to every layer output
  before the user's backward (statistic ``sampled_grads``). The loss they describe is declared
  once, here: ``loss``, ``loss_reduction``, ``mse_scale`` (:mod:`kfqn.curvature.output_losses`).
  Labels come from a counter-based stream (:mod:`kfqn.curvature.counter_rng`: ``seed`` and a
  device counter of accepted statistics steps, checkpointed), so the global RNG is left alone
  and a skipped step leaves the next draws unchanged;
* H_a = (A + gamma_A I)^{-1}, H_g = (G + gamma_G I)^{-1} every T2 steps (and every step for the
  first ``inverse_warmup``), gamma = sqrt(lambda) per side, or with ``damping_split: pi``
  gamma_A = pi sqrt(lambda), gamma_G = sqrt(lambda) / pi, pi = sqrt((tr A / d_a) / (tr G / d_g))
  (Martens & Grosse 2015, §6.3); cadences and the damped inverse:
  :mod:`kfqn.curvature.kfac_factor`;
* P = -H_g Mhat H_a.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from kfqn.core.components import Option, register
from kfqn.core.errors import KfqnError
from kfqn.curvature.base import (AEstimator, BatchMean, GEstimator, LayerContext, StepInfo,
                                 WarmStartSum, input_means)
from kfqn.curvature.counter_rng import CounterRNG
from kfqn.curvature.kfac_factor import CADENCE_OPTIONS, KFACFactorMixin
from kfqn.curvature.output_losses import LOSSES, REDUCTIONS, OutputLoss
from kfqn.layers.capture import Capture
from kfqn.preconditioners.base import TwoSidedPreconditioner

OPTIONS = {
    **CADENCE_OPTIONS,
    "warm_start": Option(True, "initialise A by a forward-only pass over the data "
                         "(opt.warm_start()); otherwise from the first batch", type=bool),
    "fisher": Option("sampled", "where g comes from: labels sampled from the model (true "
                     "Fisher), the true labels (empirical Fisher), or the exact output "
                     "Hessian square root (one backward per model output)",
                     choices=["sampled", "empirical", "exact"]),
    "loss": Option("cross_entropy", "the training loss, for fisher=sampled/exact",
                   choices=list(LOSSES)),
    "loss_reduction": Option("batch", "'batch': summed over output elements (cross-entropy: "
                             "positions), mean over samples (P2 autoencoders); 'mean': mean "
                             "over all elements (torch's default)", choices=list(REDUCTIONS)),
    "mse_scale": Option(0.5, "c in the mse loss c (z - y)^2 per element: 0.5 = half squared "
                        "error (P2 FACES), 1.0 = F.mse_loss", type=float, low=0.0,
                        open_low=True),
    "samples": Option(1, "label draws per datum (fisher=sampled)", type=int, low=1),
    "seed": Option(None, "seed of the label sampler; null = torch.initial_seed()", type=int,
                   nullable=True),
}


class _InputFactor(KFACFactorMixin, AEstimator):
    """A = EMA of (1/m) sum_i sum_t abar abar^T (warm start), H_a = (A + gamma_A I)^{-1}."""

    side, factor_key, inverse_key = "a", "A", "H_a"

    def __init__(self, ctx: LayerContext, options: Mapping[str, Any]) -> None:
        super().__init__(ctx, options)
        self._init_factor(ctx.adapter.d_a)
        self.needs_warm_start = bool(self.opts["warm_start"])
        #: device flag: the next accepted statistics step keeps the warm-start A as it is
        self._skip_next_ema = torch.zeros((), dtype=torch.bool, device=ctx.device)
        self._warm = WarmStartSum()

    owner_placement = True

    def _cov(self, inp: Tensor) -> Tensor:
        return self.ctx.adapter.input_covariance(inp).to(self.ctx.dtype)

    def batch_means(self, phase: str, step: int) -> dict[str, BatchMean]:
        if phase == "warm" or (phase == "current" and self.stats_due(step)):
            return input_means("input_covariance")
        return {}

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
            skip = self._skip_next_ema.clone()
            self._skip_next_ema &= ~info.ok         # consumed by an accepted step only
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


class _OutputFactor(KFACFactorMixin, GEstimator):
    """G = EMA of (1/(m|T|)) sum g g^T (sampled / empirical / exact), H_g = (G + gamma_G I)^{-1}."""

    side, factor_key, inverse_key = "g", "G", "H_g"

    def __init__(self, ctx: LayerContext, options: Mapping[str, Any]) -> None:
        super().__init__(ctx, options)
        self._init_factor(ctx.adapter.d_g)
        fisher = self.opts["fisher"]
        self.needs_grad_output = fisher == "empirical"
        self.needs_sampled_grads = fisher in ("sampled", "exact")
        self.loss = OutputLoss(self.opts["loss"], self.opts["loss_reduction"],
                               self.opts["mse_scale"])
        #: accepted statistics steps: the label sampler's counter (it stays put on skipped steps)
        self.draws = torch.zeros((), dtype=torch.long, device=ctx.device)
        seed = self.opts["seed"]
        self.seed = torch.initial_seed() if seed is None else int(seed)

    # -- the model-output hook's side ----------------------------------------------------------
    def wants_sampled_grads(self, step: int) -> bool:
        """Whether the optimizer should run the auxiliary backward in step ``step``."""
        return self.needs_sampled_grads and self.stats_due(step)

    def _rng(self, batch: int) -> CounterRNG:
        comm, samples = self.ctx.comm, self.opts["samples"]
        shard = None if comm is None or comm.world_size == 1 else (
            comm.rank, comm.world_size, samples, batch)
        return CounterRNG(self.seed, self.draws, shard)

    def output_cotangents(self, output: Tensor) -> Tensor:
        """(R, *output.shape) vectors to backpropagate from the model output (see module doc)."""
        if self.opts["fisher"] == "exact":
            return self.loss.hessian_sqrt(output)
        return self.loss.sampled_cotangent(output, self._rng(output.shape[0]),
                                           self.opts["samples"])

    # -- statistics -----------------------------------------------------------------------------
    owner_placement = True

    def batch_means(self, phase: str, step: int) -> dict[str, BatchMean]:
        if phase == "current" and self.stats_due(step):
            return {"G": self._local_statistic}
        return {}

    def _batch_statistic(self, cap: Capture) -> Tensor:
        """G of this batch, averaged over the data-parallel ranks."""
        return self.ctx.batch_mean("G", lambda: self._local_statistic(self.ctx.adapter, cap))

    def _local_statistic(self, adapter: Any, cap: Capture) -> Tensor:
        """(1/(m|T|)) sum_i sum_t g g^T of this rank's batch (no state read: every rank forms
        it, also under placement=owner)."""
        m, t = cap.batch, cap.positions
        if self.opts["fisher"] == "empirical":
            if cap.grad_out is None:
                raise KfqnError(f"K-FAC G side of {self.ctx.name!r}: no output gradient was "
                                "captured (call backward inside the step's closure)")
            g = adapter.per_sample_grad_outputs(cap.grad_out).reshape(-1, adapter.d_g)
        else:
            if cap.sampled_grad_out is None:
                raise KfqnError(
                    f"K-FAC G side of {self.ctx.name!r} (fisher={self.opts['fisher']}): no "
                    "sampled-label gradient reached this layer. The model passed to "
                    "build_optimizer must be called in the closure and return the tensor the "
                    "loss is computed from; otherwise use preconditioner.fisher=empirical")
            # the cotangents are per-sample gradients already: undo the adapter's factor m
            g = torch.cat([adapter.per_sample_grad_outputs(x).reshape(-1, adapter.d_g)
                           for x in cap.sampled_grad_out]) / m
        g = g.to(self.ctx.dtype)
        return g.T @ g / (m * t)

    def prepare(self, cap: Capture, info: StepInfo) -> None:
        if self.stats_due(info.step):
            self._absorb(self._batch_statistic(cap), info.ok)
            if self.needs_sampled_grads:
                self.draws.add_(info.ok.long())
        self._schedule_inverse(info.step, info.mu2)

    def apply(self, m: Tensor) -> Tensor:
        return self._inverse_or_identity() @ m if self.opts["precondition"] else m

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**self._factor_state(), "draws": self.draws, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_factor_state(state)
        if "draws" in state:
            self.draws = state["draws"].to(self.ctx.device, torch.long).clone()
            self.seed = int(state["seed"])


@register("preconditioner")
class KFACPreconditioner(TwoSidedPreconditioner):
    name = "kfac"
    description = ("K-FAC: EMA of abar abar^T and g g^T (true / empirical / exact Fisher), "
                   "(F + gamma I)^-1 every T2 steps, pi-split")
    options = OPTIONS
    owner_placement = True

    def __init__(self, ctx: LayerContext, options: Mapping[str, Any],
                 config: Mapping[str, Any]) -> None:
        super().__init__(ctx, options, config)
        self.a = _InputFactor(ctx, self.opts)
        self.g = _OutputFactor(ctx, self.opts)
        self.a.pi = self.g.pi = self.pi

    def pi(self) -> Tensor | float:
        """pi = sqrt((tr A / d_a) / (tr G / d_g)); 1 where a factor is missing, or a trace is not
        positive or not finite."""
        if self.a.mat is None or self.g.mat is None:
            return 1.0
        ta = torch.trace(self.a.mat) / self.a.dim
        tg = torch.trace(self.g.mat) / self.g.dim
        good = (ta > 0) & (tg > 0) & torch.isfinite(ta) & torch.isfinite(tg)
        ratio = ta / torch.where(good, tg, torch.ones_like(tg))
        return torch.where(good, ratio.clamp_min(0).sqrt(), torch.ones_like(ratio))

    # -- what it needs -----------------------------------------------------------------------
    @property
    def needs(self) -> frozenset[str]:
        return frozenset({"grad_outputs"} if self.opts["fisher"] == "empirical"
                         else {"sampled_grads"})

    @property
    def needs_warm_start(self) -> bool:
        return bool(self.opts["warm_start"])

    def wants_sampled_grads(self, step: int) -> bool:
        return self.g.wants_sampled_grads(step)

    def output_cotangents(self, output: Tensor) -> Tensor:
        return self.g.output_cotangents(output)
