"""G side of K-BFGS / KF-BFGS-CNN: secant pairs in pre-activation space (docs/algorithms.md §3).

s = mean h(theta) - mean h(theta+), y = mean g(theta) - mean g(theta+), means over batch and
positions, with g the per-sample pre-activation gradient. Source ``extra_pass`` [P2]: a second
forward/backward on the same minibatch at theta+ = theta + alpha P. Source ``next_iterate``
(R): the next step's forward/backward (next minibatch) closes the pair, no extra pass.

Pairs are averaged by an EMA (decay ``ema``; 0 switches it off) and the buffers hold the
undamped averages. ``ema_init: zero`` (default, the P2 authors' code) starts the averages at
sbar_0 = ybar_0 = 0, so sbar_1 = (1 - beta) s_1, sbar_2 = beta (1 - beta) s_1 + (1 - beta) s_2;
``first`` starts them at the first pair (sbar_1 = s_1). Damping (DD / DDV2 / Powell / none)
uses the current H_g; then the update rule (BFGS / L-BFGS) updates H_g (H_g0 = I). The P2 norm gate skips the
update when s^T y <= eps ||s||^2 ||gbar(theta)||.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from kfqn.core.components import Option, register
from kfqn.core.finite import finite_exact
from kfqn.core.sections import Sub
from kfqn.curvature.base import GEstimator, LayerContext, StepInfo
from kfqn.layers.capture import Capture


@register('g_estimator')
class SecantPairsG(GEstimator):
    name = "secant_pairs"
    description = "K-BFGS G side: pre-activation secant pairs, EMA, damping, BFGS/L-BFGS on H_g"
    #: its statistics are the h and g means of the capture hooks, which the optimizer averages
    owner_placement = True
    options = {
        "source": Option("extra_pass", "where theta+ is evaluated: extra_pass (same minibatch) "
                         "or next_iterate (next step's minibatch)",
                         choices=["extra_pass", "next_iterate"]),
        "ema": Option(0.9, "EMA decay of (s, y); 0 = off (full-batch training)",
                      type=float, low=0.0, high=1.0, open_high=True),
        "ema_init": Option("zero", "start of the pair averages: 'zero' (sbar_0 = ybar_0 = 0, "
                           "the P2 authors' code) or 'first' (the first pair)",
                           choices=["zero", "first"]),
        "damping": Sub("damping", "dd", "damping of the averaged pair"),
        "update": Sub("factor_update", "bfgs", "update rule for H_g"),
        "norm_gate": Option(True, "skip when s^T y <= eps ||s||^2 ||gbar|| (P2)", type=bool),
        "norm_gate_eps": Option(1e-4, "eps of the norm gate", type=float, low=0.0),
    }
    subcomponents = {"damping": "damping", "update": "factor_update"}

    def __init__(self, ctx: LayerContext, options: Mapping[str, Any]) -> None:
        super().__init__(ctx, options)
        d, dt, dev = ctx.adapter.d_g, ctx.dtype, ctx.device
        self.factor = ctx.factor(self.opts["update"], d)
        self.damping = ctx.damping(self.opts["damping"])
        self.needs_trial_pass = self.opts["source"] == "extra_pass"
        self._set_buffers(_rows2(d, dt, dev), _rows2(d, dt, dev))
        self.pairs = torch.zeros((), dtype=torch.long, device=dev)
        self.has_prev = torch.zeros((), dtype=torch.bool, device=dev)
        self.rejected = torch.zeros((), dtype=torch.long, device=dev)

    def _set_buffers(self, avg: Tensor, prev: Tensor) -> None:
        """The pair averages [s_avg; y_avg] and the previous means [prev_h; prev_g] as (2, d)
        buffers (:func:`_rows2`), each row a view (one op updates both)."""
        self._avg, self._prev = avg, prev
        self.s_avg, self.y_avg = avg.unbind(0)
        self.prev_h, self.prev_g = prev.unbind(0)

    def _cast(self, t: Tensor) -> Tensor:
        return t.to(self.ctx.dtype)

    def _absorb(self, pair: Tensor, g_ref: Tensor, allow: Tensor, mu2: float) -> None:
        """Absorb the pair [s; y] (``pair``, shape (2, d)) where ``allow``."""
        type(self)._absorb_many([self], [pair], [g_ref], [allow], [mu2])

    @staticmethod
    def _absorb_many(ests: list, pairs: list, g_refs: list, allows: list, mu2s: list) -> None:
        """:meth:`_absorb` for several layers: the pair averages layer by layer, then the
        damping and the update of every layer at one call (``Damping.many``,
        ``update_many``: the rules batch their scalar work across the layers)."""
        for e, pair, allow in zip(ests, pairs, allows):
            beta = e.opts["ema"]
            new = beta * e._avg + (1.0 - beta) * pair
            if e.opts["ema_init"] == "first":
                new = torch.where(e.pairs == 0, pair, new)
            torch.where(allow, new, e._avg, out=e._avg)   # in place: static addresses
            e.pairs.add_(allow)
        first = ests[0]
        damped = first.damping.many([e.s_avg for e in ests], [e.y_avg for e in ests],
                                    [e.factor.apply for e in ests], mu2s)
        gates, sys = [], []
        for e, d, g_ref, allow in zip(ests, damped, g_refs, allows):
            sy = torch.dot(d.s, d.y)
            gate = allow
            if e.opts["norm_gate"]:
                bound = (e.opts["norm_gate_eps"] * torch.dot(d.s, d.s)
                         * torch.linalg.vector_norm(g_ref))
                gate = gate & (sy > bound)
            gates.append(gate)
            sys.append(sy)
        accepted = type(first.factor).update_many([e.factor for e in ests],
                                                  [d.s for d in damped], [d.y for d in damped],
                                                  gates)
        for e, d, sy, acc, allow in zip(ests, damped, sys, accepted, allows):
            e.rejected.add_(allow > acc)                  # allow and not accepted
            st = e._stats
            st["sy_raw"] = torch.dot(e.s_avg, e.y_avg)
            st["sy"] = sy
            for k, act in d.active.items():
                st[f"damping_{k}"] = act
            st["g_accepted"] = acc
            st["g_rejected"] = e.rejected

    def prepare(self, cap: Capture, info: StepInfo) -> None:
        type(self).prepare_group([self], [cap], [info])

    @classmethod
    def prepare_group(cls, ests: list, caps: list, infos: list) -> None:
        if ests[0].opts["source"] != "next_iterate":
            return
        pairs, refs, allows = [], [], []
        for e, cap, info in zip(ests, caps, infos):
            cur = torch.stack([e._cast(cap.h_mean), e._cast(cap.g_mean)])
            pairs.append(e._prev - cur)
            refs.append(e.prev_g)
            allows.append(e.has_prev & info.ok)
        cls._absorb_many(ests, pairs, refs, allows, [i.mu2 for i in infos])

    def apply(self, m: Tensor) -> Tensor:
        return self.factor.apply(m)

    def apply_t(self, mt: Tensor) -> Tensor:
        return self.factor.apply_right(mt)

    def after_trial(self, cap: Capture, trial: Capture, info: StepInfo) -> None:
        type(self).after_trial_group([self], [cap], [trial], [info])

    @classmethod
    def after_trial_group(cls, ests: list, caps: list, trials: list, infos: list) -> None:
        pairs, refs, allows = [], [], []
        for e, cap, trial, info in zip(ests, caps, trials, infos):
            g = e._cast(cap.g_mean)
            cur = torch.stack([e._cast(cap.h_mean), g])
            raw = torch.stack([trial.h_mean, trial.g_mean])
            at = e._cast(raw)
            # the trial means finite (before the cast, which could overflow)
            pairs.append(cur - at)
            refs.append(g)
            allows.append(info.ok & finite_exact(raw))
        cls._absorb_many(ests, pairs, refs, allows, [i.mu2 for i in infos])

    def after_step(self, cap: Capture, info: StepInfo) -> None:
        if self.opts["source"] != "next_iterate":
            return
        cur = torch.stack([self._cast(cap.h_mean), self._cast(cap.g_mean)])
        torch.where(info.ok, cur, self._prev, out=self._prev)
        self.has_prev |= info.ok  # a skipped step keeps the pair it would close

    def factors(self) -> dict[str, Tensor]:
        return {"H_g": self.factor.dense()}

    def state_dict(self) -> dict[str, Any]:
        return {"factor": self.factor.state_dict(), "s_avg": self.s_avg, "y_avg": self.y_avg,
                "pairs": self.pairs, "prev_h": self.prev_h, "prev_g": self.prev_g,
                "has_prev": self.has_prev, "rejected": self.rejected}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.factor.load_state_dict(state["factor"])
        dev, dt = self.ctx.device, self.ctx.dtype
        bufs = []
        for a, b in (("s_avg", "y_avg"), ("prev_h", "prev_g")):
            buf = _rows2(state[a].shape[0], dt, dev)
            buf[0].copy_(state[a])
            buf[1].copy_(state[b])
            bufs.append(buf)
        self._set_buffers(*bufs)
        for key in ("pairs", "has_prev", "rejected"):
            setattr(self, key, state[key].to(dev).clone())


def _rows2(d: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A zero (2, d) buffer whose second row starts 64-byte aligned, like a tensor of its own:
    BLAS reductions (dot products, norms) of a row then round as they did on separate vectors
    (their results can depend on the alignment of the start)."""
    per = max(1, 64 // torch.empty((), dtype=dtype).element_size())
    pad = -(-d // per) * per
    return torch.zeros(2, pad, dtype=dtype, device=device)[:, :d]
