"""K-FAC's G side: EMA of per-sample pre-activation gradient outer products (docs/algorithms.md §4).

G_batch = (1/(m |T|)) sum_i sum_t g_{i,t} g_{i,t}^T (averaged over positions for Conv2d, docs/algorithms.md §2;
Grosse & Martens, *KFC*, ICML 2016), with g_{i,t} = d l_i / d h_{i,t} taken from

* ``fisher: sampled`` (default): labels drawn from the model's predictive distribution -- the
  true Fisher (Martens & Grosse, *K-FAC*, ICML 2015, §5); ``samples`` draws per datum;
* ``fisher: empirical``: the true labels, i.e. the gradients of the user's own backward;
* ``fisher: exact``: every column of the square root of the output Hessian -- the exact
  Fisher = GGN for these losses (R backward passes, R = outputs per sample; for small outputs
  and exactness checks; Botev et al., *Practical Gauss-Newton optimisation*, ICML 2017, "KFLR").

The sampled and exact variants need no second closure call: a forward hook on the model
(:meth:`kfqn.core.optimizer.KFQNOptimizer._on_model_output`) backpropagates
:meth:`output_cotangents` from the model output to each layer's output before the user's
backward. The loss they describe is declared here once: ``loss`` (cross_entropy,
sigmoid_cross_entropy, mse), ``loss_reduction`` and ``mse_scale``
(:mod:`kfqn.curvature.output_losses`). Labels are drawn from this estimator's counter-based
stream (:mod:`kfqn.curvature.counter_rng`: ``seed`` and a device counter of accepted
statistics steps, checkpointed), so the global RNG stream is left alone and a skipped step
leaves the next draws unchanged.

H_g = (G + gamma_G I)^{-1} every T2 steps, gamma_G = sqrt(lambda) (or the pi-split);
cadences, damping and inversion: :mod:`kfqn.curvature.kfac_factor`.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from kfqn.core.components import Option
from kfqn.core.errors import KfqnError
from kfqn.curvature.base import GEstimator, LayerContext, StepInfo
from kfqn.curvature.counter_rng import CounterRNG
from kfqn.curvature.kfac_factor import CADENCE_OPTIONS, KFACFactorMixin
from kfqn.curvature.output_losses import LOSSES, REDUCTIONS, OutputLoss
from kfqn.layers.capture import Capture


class KFACG(KFACFactorMixin, GEstimator):
    name = "kfac"
    description = "K-FAC G side: EMA of g g^T (true / empirical / exact Fisher), (G + gamma I)^-1"
    options = {
        **CADENCE_OPTIONS,
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
    subcomponents = {"inversion": "inversion"}
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

    def _rng(self) -> CounterRNG:
        return CounterRNG(self.seed, self.draws)

    def output_cotangents(self, output: Tensor) -> Tensor:
        """(R, *output.shape) vectors to backpropagate from the model output (see module doc)."""
        if self.opts["fisher"] == "exact":
            return self.loss.hessian_sqrt(output)
        return self.loss.sampled_cotangent(output, self._rng(), self.opts["samples"])

    # -- statistics -----------------------------------------------------------------------------
    def _batch_statistic(self, cap: Capture) -> Tensor:
        adapter, m, t = self.ctx.adapter, cap.batch, cap.positions
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
                    "loss is computed from; otherwise use g_side.fisher=empirical")
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
