"""A side of K-BFGS [P2]: EMA of A and Hessian-action BFGS for H_a (docs/algorithms.md §3).

A <- beta A + (1 - beta) (1/m) sum_i abar abar^T (beta = 0.9), warm-started by a forward-only
pass over the training data (or, without it, set from the first batch); the EMA update is
skipped at iteration 0. A_LM = A + lambda_A I with lambda_A = sqrt(lambda). At iteration 0,
H_a = A_LM^{-1}. After every step: v = mean_i abar, s_a = H_a v, y_a = A_LM s_a,
H_a <- update(H_a, s_a, y_a); s_a^T y_a >= lambda_A ||s_a||^2 so no damping is needed.
The update takes the same skip rules as H_g (the P2 authors' code): s_a^T y_a <= 0, a non-finite
result, and the norm gate s_a^T y_a <= eps ||s_a||^2 ||v|| (``norm_gate``, on by default).

A step that is skipped (non-finite loss or gradient) changes nothing, counters included.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from kfqn.core.components import Option, register
from kfqn.core.sections import Sub
from kfqn.curvature.base import (AEstimator, BatchMean, FirstBatchStart, LayerContext, StepInfo,
                                 WarmStartSum, input_means)
from kfqn.layers.base import GramPlan, LayerAdapter, cached_const
from kfqn.layers.capture import Capture


def padded_square(a: Tensor) -> Tensor:
    """A copy of the square ``a`` (D, D) as the view [:, :D] of a (D, D_p) buffer, D_p the next
    multiple of 64 bytes: the rows of A start aligned, so that the Gram products written into A
    (``addmm_``) and A s_a run at full speed for odd D (the bias column makes d_a odd; measured
    on one core: a 1001 x 1001 product into a contiguous A about 1.5x slower)."""
    d = a.shape[0]
    per = max(1, 64 // a.element_size())
    buf = a.new_zeros(d, -(-d // per) * per)
    out = buf[:, :d]
    out.copy_(a)
    return out


def _const(x: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A cached 0-dim device constant."""
    return cached_const(("scalar", x, dtype, device),
                        lambda: torch.tensor(x, dtype=dtype, device=device))


def _lengths(sizes: list[int], device: torch.device) -> Tensor:
    """The cached lengths tensor of a segmented sum over vectors of these sizes."""
    return cached_const(("lengths", tuple(sizes), device),
                        lambda: torch.tensor(sizes, dtype=torch.long, device=device))


def count_rejected(ests: list, ok: Tensor, accepted: list) -> None:
    """``a_rejected`` += ok & ~accepted for each estimator, on one (L,) vector: the counters are
    kept as that vector's entries (``unbind``), so the next step of the same group reads them
    back without a stack."""
    old = getattr(ests[0], "_rejected_group", None)
    if (old is None or len(old[1]) != len(ests)
            or not all(e._stats.get("a_rejected") is r for e, r in zip(ests, old[1]))):
        zero = _const_long(ok.device)
        prev = torch.stack([torch.as_tensor(e._stats.get("a_rejected", zero), device=ok.device)
                            for e in ests])
    else:
        prev = old[0]
    new = prev + (ok > torch.stack(accepted))   # on bools, ok > acc is ok & ~acc
    parts = new.unbind()
    for e, r in zip(ests, parts):
        e._stats["a_rejected"] = r
        e._rejected_group = (new, parts)


def _const_long(device: torch.device) -> Tensor:
    return cached_const(("zero_long", device),
                        lambda: torch.zeros((), dtype=torch.long, device=device))


@register('a_estimator')
class EMAHessianActionA(AEstimator):
    name = "ema_hessian_action"
    description = "K-BFGS A side [P2]: EMA of A, Hessian-action BFGS for H_a"
    options = {
        "beta": Option(0.9, "EMA decay of A", type=float, low=0.0, high=1.0, open_high=True),
        "warm_start": Option(True, "initialise A by a forward-only pass over the data "
                             "(opt.warm_start()); otherwise from the first batch", type=bool),
        "update": Sub("factor_update", "bfgs", "update rule for H_a"),
        "damping": Sub("damping", "none", "damping of the (s_a, y_a) pair"),
        "norm_gate": Option(True, "skip the H_a update when s_a^T y_a <= eps ||s_a||^2 ||v|| "
                            "(P2 authors' code)", type=bool),
        "norm_gate_eps": Option(1e-4, "eps of the norm gate", type=float, low=0.0),
        "inversion": Sub("inversion", "cholesky", "inverse of A_LM at iteration 0"),
    }
    subcomponents = {"update": "factor_update", "damping": "damping", "inversion": "inversion"}
    owner_placement = True

    def batch_means(self, phase: str, step: int) -> dict[str, BatchMean]:
        # the batch A (warm start, first-batch start, the EMA) and the input mean v
        if phase == "warm":
            return input_means("input_covariance")
        return input_means("input_covariance", "input_mean") if phase == "current" else {}

    def __init__(self, ctx: LayerContext, options: Mapping[str, Any]) -> None:
        super().__init__(ctx, options)
        d = ctx.adapter.d_a
        self.factor = ctx.factor(self.opts["update"], d)
        self.damping = ctx.damping(self.opts["damping"])
        self.inversion = ctx.inversion(self.opts["inversion"])
        self.needs_warm_start = bool(self.opts["warm_start"])
        self.a: Tensor | None = None
        #: accepted steps seen (device); the EMA of A starts at the second one (iteration 0 keeps
        #: the warm-start or first-batch A)
        self.ema_updates = torch.zeros((), dtype=torch.long, device=ctx.device)
        self._warm = WarmStartSum()
        #: without a warm start, A and H_a start from the first accepted batch
        self._start: FirstBatchStart | None = None

    def _cov(self, inp: Tensor) -> Tensor:
        return self.ctx.adapter.input_covariance(inp).to(self.ctx.dtype)

    def _set_a(self, a: Tensor) -> None:
        """A <- a: copied into the state tensor when there is one (its address and the cached
        views of :meth:`_gram_plan` stay), else a new padded one (:func:`padded_square`)."""
        if self.a is not None and self.a.shape == a.shape:
            self.a.copy_(a)
        else:
            self.a = padded_square(a)

    def _set_start(self, a: Tensor, lam_a: float) -> None:
        self._set_a(a)
        res = self.inversion.invert(a, lam_a)
        self.factor.reset(res.inverse if self.factor.accepts_dense_init else None)
        self._stats["a_inversion_fallback"] = res.fallback

    # -- warm start ---------------------------------------------------------------------------
    def warm_accumulate(self, inp: Tensor) -> None:
        self._warm.add(self._cov(inp), inp.shape[0])

    def warm_finish(self, lam_a: float) -> None:
        a = self._warm.mean()
        if a is None:
            return
        self._set_start(a, lam_a)

    # -- per step --------------------------------------------------------------------------
    def prepare(self, cap: Capture, info: StepInfo) -> None:
        if self.a is None and self._start is None:
            self._start = FirstBatchStart(self.ctx.device)
        if self._start is not None and self._start.due():
            a = self._cov(cap.inp)
            good = info.ok & torch.isfinite(a).all()
            self._set_start(torch.where(good, a, torch.zeros_like(a)), info.lam_a)
            self._start.taken(good)

    def after_step(self, cap: Capture, info: StepInfo) -> None:
        type(self).after_step_group([self], [cap], [info])

    # -- after the move, several layers at one call -----------------------------------------
    def _batch_key(self, cap: Capture, info: StepInfo) -> tuple | None:
        """The key of the layers that :meth:`_after_step_batched` takes together (same options
        and one ``ok`` flag), or None where the layer needs the per-layer path: an adapter
        without cheap rows (convolutions), a reducing (data-parallel) adapter, no A yet, or an
        input of another dtype than A."""
        ad = self.ctx.adapter
        if (not isinstance(ad, LayerAdapter) or not ad.cheap_rows or self.a is None
                or cap.inp.dtype != self.a.dtype or self.ctx.dtype != self.a.dtype):
            return None
        o = self.opts
        return (o["beta"], o["norm_gate"], o["norm_gate_eps"], self.a.dtype, self.a.device,
                id(info.ok))

    @classmethod
    def after_step_group(cls, ests: list, caps: list, infos: list) -> None:
        """The EMA of A and the pairs (s_a, y_a): layers with cheap input rows (Linear) by
        :meth:`_after_step_batched`, a few ops per layer and the scalar work once per group;
        the others layer by layer (:meth:`_after_step_loop`)."""
        groups: dict = {}
        for i, (e, cap, info) in enumerate(zip(ests, caps, infos)):
            groups.setdefault(e._batch_key(cap, info), []).append(i)
        if len({id(e) for e in ests}) < len(ests):   # a layer listed twice: in turn
            groups = {None: list(range(len(ests)))}
        for key, idx in groups.items():
            run = cls._after_step_loop if key is None else cls._after_step_batched
            run([ests[i] for i in idx], [caps[i] for i in idx], [infos[i] for i in idx])

    @classmethod
    def _after_step_batched(cls, ests: list, caps: list, infos: list) -> None:
        """For L layers of one key (:meth:`_batch_key`), per layer: abar = [a, 1] (one cat),
        v = mean abar, A <- keep A + (1 - beta)/m abar_m^T abar_m (abar_m: abar where the EMA
        runs, else 0; keep = beta there, else 1), s_a = H_a v, y_a = A s_a + lambda_A s_a.
        Once for the L layers (on (L,) vectors): the EMA flags and ``keep`` (one ``_foreach_mul_``
        scales every A), the counters, the norm gate s^T y > eps ||s||^2 ||v|| from one
        segmented sum of the joined products, the statistics."""
        first, ok = ests[0], infos[0].ok
        dt, dev = first.a.dtype, first.a.device
        beta = first.opts["beta"]
        zero, one, beta_t = (_const(x, dt, dev) for x in (0.0, 1.0, beta))
        # iteration 0 uses the warm-start (or first-batch) A as it is
        mask = (torch.stack([e.ema_updates for e in ests]) > 0) & ok
        torch._foreach_mul_([e.a for e in ests], torch.where(mask, beta_t, one).unbind())
        torch._foreach_add_([e.ema_updates for e in ests], ok)   # long += bool: + 1 where ok
        ss, ys, vs = [], [], []
        for e, cap, info, ema in zip(ests, caps, infos, mask.unbind()):
            abar = e.ctx.adapter.homogeneous_rows(cap.inp)
            v = abar.mean(0)
            e._gram_plan().add_(torch.where(ema, abar, zero), (1.0 - beta) / cap.inp.shape[0])
            s = e.factor.apply(v)
            ys.append(torch.addmv(s, e.a, s, beta=info.lam_a))   # A_LM s = A s + lambda_A s
            ss.append(s)
            vs.append(v)
        damped = first.damping.many(ss, ys, [e.factor.apply for e in ests],
                                    [i.lam_a for i in infos])
        ds, dy = [d.s for d in damped], [d.y for d in damped]
        # s^T y, s^T s, v^T v of every layer: one segmented sum over the joined products
        sums = torch.segment_reduce(torch.cat(ds + ds + vs) * torch.cat(dy + ds + vs), "sum",
                                    lengths=_lengths([x.shape[0] for x in ds + ds + vs], dev))
        sy, sn, vv = sums.split(len(ests))
        if first.opts["norm_gate"]:
            allow = list((ok & (sy > first.opts["norm_gate_eps"] * sn * vv.sqrt())).unbind())
        else:
            allow = [ok] * len(ests)
        accepted = type(first.factor).update_many([e.factor for e in ests], ds, dy, allow)
        for e, sy_i in zip(ests, sy.unbind()):
            e._stats["a_sy"] = sy_i
        count_rejected(ests, ok, accepted)

    def _gram_plan(self) -> GramPlan:
        """The cached views of A for the EMA's Gram product (rebuilt when A was replaced)."""
        plan = getattr(self, "_plan", None)
        if plan is None or not plan.valid_for(self.a):
            plan = self._plan = GramPlan(self.a)
        return plan

    @classmethod
    def _after_step_loop(cls, ests: list, caps: list, infos: list) -> None:
        """The EMA of A and the pair (s_a, y_a) layer by layer; the damping and the update of
        every layer at one call (the rules batch their scalar work across the layers)."""
        ss, ys, vs = [], [], []
        for e, cap, info in zip(ests, caps, infos):
            ok = info.ok
            # iteration 0 uses the warm-start (or first-batch) A as it is
            e._ema(cap.inp, ok & (e.ema_updates > 0))
            e.ema_updates.add_(ok.long())
            v = e.ctx.adapter.input_mean(cap.inp).to(e.ctx.dtype)
            s = e.factor.apply(v)
            ys.append(torch.addmv(s, e.a, s, beta=info.lam_a))   # A_LM s = A s + lambda_A s
            ss.append(s)
            vs.append(v)
        first = ests[0]
        damped = first.damping.many(ss, ys, [e.factor.apply for e in ests],
                                    [i.lam_a for i in infos])
        allows = []
        for e, d, v, info in zip(ests, damped, vs, infos):
            allow = info.ok
            if e.opts["norm_gate"]:
                sy, sn = torch.dot(d.s, d.y), torch.dot(d.s, d.s)
                allow = allow & (sy > e.opts["norm_gate_eps"] * sn * torch.linalg.vector_norm(v))
            allows.append(allow)
        accepted = type(first.factor).update_many([e.factor for e in ests],
                                                  [d.s for d in damped], [d.y for d in damped],
                                                  allows)
        for e, d, acc, info in zip(ests, damped, accepted, infos):
            e._stats["a_sy"] = torch.dot(d.s, d.y)
            e._stats["a_rejected"] = e._stats.get("a_rejected", 0) + (info.ok & ~acc).long()

    def _ema(self, inp: Tensor, ok: Tensor) -> None:
        """A <- beta A + (1 - beta) A_batch where ``ok``, else unchanged; in place when the
        input has the factor dtype (one product accumulated into A, no (d_a, d_a) temporary)."""
        beta = self.opts["beta"]
        if inp.dtype != self.a.dtype:
            self.a.copy_(torch.where(ok, beta * self.a + (1.0 - beta) * self._cov(inp), self.a))
            return
        keep = 1.0 - (1.0 - beta) * ok.to(self.a.dtype)   # beta where ok, else 1 (no H2D copy)
        self.a.mul_(keep)
        self.ctx.adapter.add_covariance_(self.a, inp, (1.0 - beta) / inp.shape[0], mask=ok)

    def factors(self) -> dict[str, Tensor]:
        out = {"H_a": self.factor.dense()}
        if self.a is not None:
            out["A"] = self.a.clone()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"A": self.a, "ema_updates": self.ema_updates, "factor": self.factor.state_dict(),
                "start": None if self._start is None else self._start.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        a = state["A"]
        if a is None:
            self.a = None
        else:
            self._set_a(a.to(self.ctx.device, self.ctx.dtype))
        self.ema_updates = torch.as_tensor(state["ema_updates"]).to(self.ctx.device,
                                                                    torch.long).clone()
        self.factor.load_state_dict(state["factor"])
        start = state.get("start")
        self._start = None
        if start is not None:
            self._start = FirstBatchStart(self.ctx.device)
            self._start.load_state_dict(start)
