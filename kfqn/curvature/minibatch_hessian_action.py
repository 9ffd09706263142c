"""A side of KF-BFGS-CNN [P1]: minibatch Hessian-action BFGS, A never stored (docs/algorithms.md §3).

After every step: v = mean over batch and positions of abar, s_a = H_a v,
y_a = (1/m) sum_i sum_t abar_{i,t} (abar_{i,t}^T s_a) + lambda_A s_a (two convolutions or
mat-vecs, O(m |T| d_a)), damped (Powell by default, (R)), then H_a <- update(H_a, s_a, y_a).
H_a starts from the first batch's (A + lambda_A I)^{-1} (default) or the identity (R).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from kfqn.core.components import Option, register
from kfqn.core.errors import ConfigError
from kfqn.core.sections import Sub
from kfqn.curvature.base import (AEstimator, BatchMean, FirstBatchStart, LayerContext, StepInfo,
                                 input_means)
from kfqn.curvature.ema_hessian_action import _lengths, count_rejected
from kfqn.layers.base import LayerAdapter
from kfqn.layers.capture import Capture


@register('a_estimator')
class MinibatchHessianActionA(AEstimator):
    name = "minibatch_hessian_action"
    description = "KF-BFGS-CNN A side [P1]: minibatch Hessian action, A never stored"
    options = {
        "init": Option("batch_inverse", "H_a at iteration 0: first batch's (A + lambda_A I)^-1 "
                       "or the identity", choices=["batch_inverse", "identity"]),
        "update": Sub("factor_update", "bfgs", "update rule for H_a (bfgs, or lbfgs to save memory)"),
        "damping": Sub("damping", "powell", "damping of the (s_a, y_a) pair ('none' = undamped)"),
        "inversion": Sub("inversion", "cholesky", "inverse for init=batch_inverse"),
    }
    subcomponents = {"update": "factor_update", "damping": "damping", "inversion": "inversion"}
    owner_placement = True

    def batch_means(self, phase: str, step: int) -> dict[str, BatchMean]:
        """v every step; the batch A at the first-batch start and, under ``placement: owner``,
        every step: the other ranks cannot form the action A s_a without H_a, so the owner
        takes y_a = A s_a from the averaged A (d_a^2 numbers instead of d_a). Otherwise the
        action at s_a = H_a v (v averaged in the closure's round) is declared for after the
        move ('moved': every rank holds H_a), d_a numbers in the next round."""
        if phase == "moved":
            memo = getattr(self.ctx.adapter, "memo", {})
            if self.ctx.placement == "owner" or "input_covariance" in memo:
                return {}
            return {"hessian_action": self._local_action}
        if phase != "current":
            return {}
        start = self.opts["init"] == "batch_inverse" and (not self.initialised
                                                           or self._start.due())
        if self.ctx.placement == "owner" or start:
            return input_means("input_mean", "input_covariance")
        return input_means("input_mean")

    @classmethod
    def check_options(cls, options: Mapping[str, Any], builder: Any, where: str) -> None:
        upd = builder.registry.get("factor_update", options["update"]["name"])
        if options["init"] == "batch_inverse" and not upd.accepts_dense_init:
            raise ConfigError(
                f"{where}.init = 'batch_inverse' needs an update rule that starts from a dense "
                f"matrix, but {where}.update = {options['update']['name']!r} does not; "
                f"set {where}.init=identity or {where}.update=bfgs")

    def __init__(self, ctx: LayerContext, options: Mapping[str, Any]) -> None:
        super().__init__(ctx, options)
        self.factor = ctx.factor(self.opts["update"], ctx.adapter.d_a)
        self.damping = ctx.damping(self.opts["damping"])
        self.inversion = ctx.inversion(self.opts["inversion"])
        self.initialised = False
        self._start = FirstBatchStart(ctx.device)

    def prepare(self, cap: Capture, info: StepInfo) -> None:
        if self.opts["init"] == "identity":
            if not self.initialised:
                self.factor.reset(None)
            self.initialised = True
            return
        if not self._start.due():  # H_a from the first accepted batch (FirstBatchStart)
            return
        self.initialised = True
        a = self.ctx.adapter.input_covariance(cap.inp).to(self.ctx.dtype)
        good = info.ok & torch.isfinite(a).all()
        res = self.inversion.invert(torch.where(good, a, torch.zeros_like(a)), info.lam_a)
        self.factor.reset(res.inverse)
        self._start.taken(good)
        self._stats["a_inversion_fallback"] = res.fallback

    def _local_action(self, adapter: Any, cap: Capture) -> Tensor:
        """This rank's (1/m) sum abar abar^T s_a at the s_a that :meth:`after_step` forms."""
        s = self.factor.apply(self.ctx.adapter.input_mean(cap.inp).to(self.ctx.dtype))
        return adapter.hessian_action(cap.inp, s.to(cap.inp.dtype))

    def after_step(self, cap: Capture, info: StepInfo) -> None:
        type(self).after_step_group([self], [cap], [info])

    def _rows_fast(self, cap: Capture) -> bool:
        """Whether the pair can be formed from abar = [a, 1] directly (:meth:`after_step_group`):
        an adapter with cheap rows (Linear; not a reducing, data-parallel one) and an input of
        the factor dtype."""
        ad = self.ctx.adapter
        return (isinstance(ad, LayerAdapter) and ad.cheap_rows
                and cap.inp.dtype == self.ctx.dtype)

    @classmethod
    def after_step_group(cls, ests: list, caps: list, infos: list) -> None:
        """The pair (s_a, y_a) layer by layer; the damping and the update of every layer at
        one call (the rules batch their scalar work across the layers), the statistics on
        (L,) vectors. For cheap rows (Linear) five ops per layer: abar = [a, 1], v = mean abar,
        z = abar s_a, y_a = (1/m) abar^T z + lambda_A s_a (one ``addmv``)."""
        ss, ys = [], []
        for e, cap, info in zip(ests, caps, infos):
            adapter, dt = e.ctx.adapter, e.ctx.dtype
            if e._rows_fast(cap):
                abar = adapter.homogeneous_rows(cap.inp)
                s = e.factor.apply(abar.mean(0))
                ys.append(torch.addmv(s, abar.T, abar @ s, beta=info.lam_a,
                                      alpha=1.0 / cap.inp.shape[0]))
                ss.append(s)
                continue
            v = adapter.input_mean(cap.inp).to(dt)
            s = e.factor.apply(v)
            ys.append(adapter.hessian_action(cap.inp, s.to(cap.inp.dtype)).to(dt)
                      + info.lam_a * s)
            ss.append(s)
        first = ests[0]
        damped = first.damping.many(ss, ys, [e.factor.apply for e in ests],
                                    [i.lam_a for i in infos])
        accepted = type(first.factor).update_many([e.factor for e in ests],
                                                  [d.s for d in damped], [d.y for d in damped],
                                                  [i.ok for i in infos])
        for e, d in zip(ests, damped):
            for k, act in d.active.items():
                e._stats[f"a_{k}"] = act
        oks = [i.ok for i in infos]
        if all(o is oks[0] for o in oks):
            # s^T y of every layer: the damping's own (flat path; 0 where it zeroed the pair),
            # else one segmented sum; the counters on one (L,) vector
            flat = getattr(first.damping, "last_flat", None)
            if flat is not None:
                sy = torch.where(flat.ok, flat.so, 0.0)
            else:
                ds, dy = [d.s for d in damped], [d.y for d in damped]
                sy = torch.segment_reduce(
                    torch.cat(ds) * torch.cat(dy), "sum",
                    lengths=_lengths([x.shape[0] for x in ds], oks[0].device))
            for e, sy_i in zip(ests, sy.unbind()):
                e._stats["a_sy"] = sy_i
            count_rejected(ests, oks[0], accepted)
            return
        for e, d, acc, info in zip(ests, damped, accepted, infos):
            e._stats["a_sy"] = torch.dot(d.s, d.y)
            e._stats["a_rejected"] = e._stats.get("a_rejected", 0) + (info.ok & ~acc).long()

    def factors(self) -> dict[str, Tensor]:
        return {"H_a": self.factor.dense()}

    def state_dict(self) -> dict[str, Any]:
        return {"initialised": self.initialised, "factor": self.factor.state_dict(),
                "start": self._start.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.initialised = bool(state["initialised"])
        self.factor.load_state_dict(state["factor"])
        start = state.get("start")
        if start is not None or self.initialised:
            self._start.load_state_dict(start)
