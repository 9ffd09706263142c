"""The Kronecker family of K-BFGS, K-BFGS(L), KF-BFGS-CNN and their variants: H_a (x) H_g from
an A-side and a G-side curvature estimator, each its own registered component
(docs/algorithms.md §3-4)::

    P = -H_g Mhat H_a

The estimators are named in the config sections ``a_side`` (kind ``a_estimator``: e.g.
``ema_hessian_action``, ``minibatch_hessian_action``) and ``g_side`` (kind ``g_estimator``:
``secant_pairs``); inside them the factor update rules, damping rules and inversion strategies
are again components chosen by name. Order within a step: G side, then A side ``prepare``;
the direction; A side ``after_step``; the G side's pair from the trial pass; G side
``after_step``.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

from kfqn.core.components import register
from kfqn.curvature.base import LayerContext, StepInfo
from kfqn.preconditioners.base import TwoSidedPreconditioner


def _by_class(items: list) -> list[tuple[type, list[int]]]:
    """(class, positions) of ``items`` grouped by class, in order of first appearance."""
    groups: dict[type, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(type(item), []).append(i)
    return list(groups.items())


@register("preconditioner")
class KroneckerPreconditioner(TwoSidedPreconditioner):
    name = "kronecker"
    description = "H_a (x) H_g from the a_side and g_side estimators (K-BFGS family)"
    options: dict = {}
    sections = ("a_side", "g_side")
    owner_placement = True  # if both estimators declare their statistics (supports_owner_...)

    def __init__(self, ctx: LayerContext, options: Mapping[str, Any],
                 config: Mapping[str, Any]) -> None:
        super().__init__(ctx, options, config)
        self.a = ctx.builder.estimator("a_estimator", config["a_side"], ctx)
        self.g = ctx.builder.estimator("g_estimator", config["g_side"], ctx)

    @property
    def needs(self) -> frozenset[str]:
        out = set()
        if getattr(self.g, "needs_grad_output", False):
            out.add("grad_outputs")
        if getattr(self.g, "needs_sampled_grads", False):
            out.add("sampled_grads")
        if self.g.needs_trial_pass:
            out.add("trial")
        return frozenset(out)

    @property
    def needs_warm_start(self) -> bool:
        return bool(self.a.needs_warm_start)

    def wants_sampled_grads(self, step: int) -> bool:
        return self.g.wants_sampled_grads(step)

    def output_cotangents(self, output: Tensor) -> Tensor:
        return self.g.output_cotangents(output)

    # several layers at one call: each side's estimators batch their updates across layers
    @classmethod
    def prepare_group(cls, precs: list, stats: list, infos: list) -> None:
        caps = [s.current for s in stats]
        for side in ("g", "a"):   # G side first, as prepare does
            for est_cls, idx in _by_class([getattr(p, side) for p in precs]):
                est_cls.prepare_group([getattr(precs[i], side) for i in idx],
                                      [caps[i] for i in idx], [infos[i] for i in idx])

    @classmethod
    def after_move_group(cls, precs: list, stats: list, infos: list) -> None:
        for est_cls, idx in _by_class([p.a for p in precs]):
            est_cls.after_step_group([precs[i].a for i in idx], [stats[i].current for i in idx],
                                     [infos[i] for i in idx])

    @classmethod
    def after_trial_group(cls, precs: list, stats: list, infos: list) -> None:
        keep = [i for i, s in enumerate(stats) if s.trial is not None and s.trial.complete]
        for est_cls, idx in _by_class([precs[i].g for i in keep]):
            idx = [keep[j] for j in idx]
            est_cls.after_trial_group([precs[i].g for i in idx], [stats[i].current for i in idx],
                                      [stats[i].trial for i in idx], [infos[i] for i in idx])

    @classmethod
    def end_step_group(cls, precs: list, stats: list, infos: list) -> None:
        for est_cls, idx in _by_class([p.g for p in precs]):
            est_cls.after_step_group([precs[i].g for i in idx], [stats[i].current for i in idx],
                                     [infos[i] for i in idx])

    def after_move(self, stats: Any, info: StepInfo) -> None:
        self.a.after_step(stats.current, info)

    def after_trial(self, stats: Any, info: StepInfo) -> None:
        if stats.trial is not None and stats.trial.complete:
            self.g.after_trial(stats.current, stats.trial, info)

    def end_step(self, stats: Any, info: StepInfo) -> None:
        self.g.after_step(stats.current, info)

    def stats(self) -> dict[str, Tensor]:
        out = super().stats()
        for side, est in (("a", self.a), ("g", self.g)):
            factor_stats = getattr(getattr(est, "factor", None), "stats", None)
            if factor_stats is not None:  # resets of a factor that became non-finite
                out.update({f"{side}_{k}": v for k, v in factor_stats().items()})
        return out

    def state_bytes(self) -> int:
        return self.a.state_bytes() + self.g.state_bytes()
