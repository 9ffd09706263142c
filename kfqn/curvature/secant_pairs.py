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

Several layers at one call (the ``*_group`` hooks): the layers of a family keep their state in
flat buffers of a :class:`_Group` (the layers' vectors end to end, :class:`~kfqn.updates.damping.Layout`),
each estimator's ``s_avg``, ``y_avg``, ``prev_h``, ``prev_g``, ``pairs``, ``has_prev`` and
``rejected`` being views of them (built at the first group call, then at fixed addresses). The
pair formation, the averages, the finiteness tests, the damping (``Damping.flat``) and the norm
gate are then one op each for all layers; only H y and the factor update are per layer.
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
from kfqn.updates.damping import Flat, Layout, Work


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
        #: the :class:`_Group` whose buffers hold this layer's state (None: its own)
        self._group: _Group | None = None
        #: (the last flat step's :class:`_Outcome`, this layer's index) for :meth:`stats`
        self._last: tuple | None = None

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
            e._last = None
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
        grp = _Group.of(ests, caps)
        if grp is not None:
            grp.prepare(caps, infos)
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
        grp = _Group.of(ests, caps, trials)
        if grp is not None:
            grp.after_trial(caps, trials, infos)
            return
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
        type(self).after_step_group([self], [cap], [info])

    @classmethod
    def after_step_group(cls, ests: list, caps: list, infos: list) -> None:
        if ests[0].opts["source"] != "next_iterate":
            return
        grp = _Group.of(ests, caps)
        if grp is not None:
            grp.after_step(caps, infos)
            return
        for e, cap, info in zip(ests, caps, infos):
            cur = torch.stack([e._cast(cap.h_mean), e._cast(cap.g_mean)])
            torch.where(info.ok, cur, e._prev, out=e._prev)
            e.has_prev |= info.ok  # a skipped step keeps the pair it would close

    def stats(self) -> dict[str, Tensor]:
        out = dict(self._stats)
        last = self._last
        if last is not None:   # the last flat step's figures, formed now (not in the step)
            out.update(last[0].stats(last[1]))
            out["g_rejected"] = self.rejected
        return out

    def factors(self) -> dict[str, Tensor]:
        return {"H_g": self.factor.dense()}

    def state_dict(self) -> dict[str, Any]:
        return {"factor": self.factor.state_dict(), "s_avg": self.s_avg, "y_avg": self.y_avg,
                "pairs": self.pairs, "prev_h": self.prev_h, "prev_g": self.prev_g,
                "has_prev": self.has_prev, "rejected": self.rejected}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.factor.load_state_dict(state["factor"])
        dev, dt = self.ctx.device, self.ctx.dtype
        self._last = None
        if state["s_avg"].shape == self.s_avg.shape:   # into the buffers: same addresses
            for key in ("s_avg", "y_avg", "prev_h", "prev_g", "pairs", "has_prev", "rejected"):
                getattr(self, key).copy_(state[key])
            return
        bufs = []
        for a, b in (("s_avg", "y_avg"), ("prev_h", "prev_g")):
            buf = _rows2(state[a].shape[0], dt, dev)
            buf[0].copy_(state[a])
            buf[1].copy_(state[b])
            bufs.append(buf)
        self._set_buffers(*bufs)
        for key in ("pairs", "has_prev", "rejected"):
            setattr(self, key, state[key].to(dev).clone())
        self._group = None   # no longer views of a group's buffers


def _rows2(d: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A zero (2, d) buffer whose second row starts 64-byte aligned, like a tensor of its own:
    BLAS reductions (dot products, norms) of a row then round as they did on separate vectors
    (their results can depend on the alignment of the start)."""
    per = max(1, 64 // torch.empty((), dtype=dtype).element_size())
    pad = -(-d // per) * per
    return torch.zeros(2, pad, dtype=dtype, device=device)[:, :d]


class _Outcome:
    """One flat step's per-layer figures as (L,) vectors; a layer's stats entries are formed
    from them when asked (:meth:`SecantPairsG.stats`), not in the step."""

    def __init__(self, res: Flat, accepted: list[Tensor], damping: Any, dtype) -> None:
        self.res, self.accepted, self.damping, self.dtype = res, accepted, damping, dtype
        self._done: tuple | None = None

    def _finished(self) -> tuple:
        if self._done is None:
            res = self.res
            so = res.so.to(self.dtype)
            if self.damping is None:
                self._done = (so, res.active)
            else:   # the damped pair is zero where not ok: s^T y = 0 there
                self._done = (torch.where(res.ok, so, torch.zeros_like(so)),
                              self.damping.finish_active(res))
        return self._done

    def stats(self, i: int) -> dict[str, Tensor]:
        sy, active = self._finished()
        out = {"sy_raw": self.res.sy0[i], "sy": sy[i]}
        for k, act in active.items():
            out[f"damping_{k}"] = act[i] if act.dim() else act
        out["g_accepted"] = self.accepted[i]
        return out


class _Group:
    """The flat state of a family's :class:`SecantPairsG` estimators (same options, dtype and
    device): the layers' vectors end to end (:class:`~kfqn.updates.damping.Layout`) in

    * ``work`` (:class:`~kfqn.updates.damping.Work`): rows s, y are the pair averages
      [sbar; ybar] (state), the other rows the damping's;
    * ``prev`` (2, D): [prev_h; prev_g] (state, ``next_iterate``);
    * ``counts`` (2, L) long: pairs, rejected; ``has_prev`` (L,) bool (state);
    * ``means`` (7, D): the capture means of a step, rows [h; g; h+; g+; g; 0; 0] (work): the
      products rows 1:4 * rows 4:7 are [g g; h+ 0; g+ 0], i.e. ||g||^2 and the exact
      finiteness tests of the trial means in one segmented sum.

    The estimators' state tensors become views of these buffers when the group is built (the
    first group call); after that every step updates them in place."""

    def __init__(self, ests: list) -> None:
        e0 = ests[0]
        lay = self.lay = Layout([e.s_avg.shape[0] for e in ests], e0.ctx.dtype, e0.ctx.device)
        self.members = list(ests)
        self.opts = e0.opts
        self.damping = e0.damping
        self.work = Work(lay)
        self.prev = lay.rows(2)
        dev, n = lay.device, lay.n
        with torch.inference_mode(False):
            self.counts = torch.zeros(2, n, dtype=torch.long, device=dev)
            self.has_prev = torch.zeros(n, dtype=torch.bool, device=dev)
        self.means = lay.rows(7)
        m = self.means
        self._cur, self._trial = m[0:2], m[2:4]
        self._cur_flat, self._head5, self._head4 = (m[0:2].view(-1), m[0:5].view(-1),
                                                    m[0:4].view(-1))
        self._gg_fin = (m[1:4], m[4:7])
        self._fin = (m[2:4], m[5:7])
        self._avg = self.work.buf[0:2]
        self._pairs, self._rejected = self.counts[0], self.counts[1]
        self._prev_g = self.prev[1:2]   # (1, D): dots need a row dimension
        w = self.work
        for i, (e, o, d) in enumerate(zip(ests, lay.offs, lay.dims)):
            avg, prev = w.buf[0:2, o:o + d], self.prev[:, o:o + d]
            avg.copy_(e._avg)
            prev.copy_(e._prev)
            self.counts[0, i].copy_(e.pairs)
            self.counts[1, i].copy_(e.rejected)
            self.has_prev[i].copy_(e.has_prev)
            e._set_buffers(avg, prev)
            e.pairs, e.rejected, e.has_prev = self.counts[0, i], self.counts[1, i], self.has_prev[i]
            e._group = self
        self.factors = [e.factor for e in ests]
        self.undamped = not hasattr(self.damping, "flat")
        self.s_views = lay.views(w.s) if self.undamped else w.out_views
        self.y_views = lay.views(w.y) if self.undamped else w.out2_views

    @staticmethod
    def of(ests: list, *caps_lists: list) -> "_Group | None":
        """The group of ``ests`` (built at the first call); None where the flat path does not
        apply (mixed options, dtypes or devices, a damping without ``flat`` other than none,
        capture means that would narrow, layers grouped otherwise before)."""
        grp = ests[0]._group
        if grp is not None:
            ok = len(grp.members) == len(ests) and all(
                a is b and b._group is grp for a, b in zip(grp.members, ests))
            return grp if ok and _means_fit(grp.lay.dtype, caps_lists) else None
        e0 = ests[0]
        dt, dev = e0.ctx.dtype, e0.ctx.device
        if (dt not in (torch.float32, torch.float64)
                or any(e._group is not None or e.opts != e0.opts or e.ctx.dtype != dt
                       or e.ctx.device != dev or type(e.damping) is not type(e0.damping)
                       or e.s_avg.dim() != 1 for e in ests)
                or not (hasattr(e0.damping, "flat") or e0.damping.name == "none")
                or not _means_fit(dt, caps_lists)):
            return None
        return _Group(ests)

    # -- the sources ------------------------------------------------------------------------
    def after_trial(self, caps: list, trials: list, infos: list) -> None:
        """extra_pass: [s; y] = [h; g] - [h+; g+], allowed where ok and the trial means are
        finite; the norm gate's reference is the current g."""
        lay, gate = self.lay, self.opts["norm_gate"]
        cast = self._cast
        rows = [cast(c.h_mean) for c in caps], [cast(c.g_mean) for c in caps]
        parts = (lay.padded(rows[0]) + lay.padded(rows[1])
                 + lay.padded([cast(t.h_mean) for t in trials])
                 + lay.padded([cast(t.g_mean) for t in trials]))
        if gate:
            torch.cat(parts + lay.padded(rows[1]), out=self._head5)
            gg, f1, f2 = lay.dots(*self._gg_fin, cast=False).unbind()
            fin, norm = (f1 + f2) == 0, gg.sqrt()
        else:
            torch.cat(parts, out=self._head4)
            fin, norm = lay.dots(*self._fin, cast=False).sum(0) == 0, None
        self._absorb(torch.sub(self._cur, self._trial), infos[0].ok & fin, norm, infos)

    def prepare(self, caps: list, infos: list) -> None:
        """next_iterate: [s; y] = [prev_h; prev_g] - [h; g], allowed where a pair is open and
        ok; the norm gate's reference is prev_g."""
        lay = self.lay
        self._cat_cur(caps)
        norm = None
        if self.opts["norm_gate"]:
            norm = lay.dots(self._prev_g, self._prev_g, cast=False)[0].sqrt()
        self._absorb(torch.sub(self.prev, self._cur), self.has_prev & infos[0].ok, norm, infos)

    def after_step(self, caps: list, infos: list) -> None:
        """next_iterate: the current means open the next pair (where ok)."""
        self._cat_cur(caps)
        ok = infos[0].ok
        torch.where(ok, self._cur, self.prev, out=self.prev)
        self.has_prev.logical_or_(ok)   # a skipped step keeps the pair it would close

    def _cat_cur(self, caps: list) -> None:
        lay, cast = self.lay, self._cast
        torch.cat(lay.padded([cast(c.h_mean) for c in caps])
                  + lay.padded([cast(c.g_mean) for c in caps]), out=self._cur_flat)

    def _cast(self, t: Tensor) -> Tensor:
        return t.to(self.lay.dtype)

    # -- averages, damping, gate, update ------------------------------------------------------
    def _absorb(self, pair: Tensor, allow: Tensor, norm: Tensor | None, infos: list) -> None:
        """sbar, ybar <- beta [sbar; ybar] + (1 - beta) [s; y] where ``allow`` ((L,) bool),
        then damping, norm gate and the factor updates of every layer."""
        lay, w, opts = self.lay, self.work, self.opts
        beta = opts["ema"]
        # beta avg + (1 - beta) pair, the second product fused into the sum (one rounding)
        new = torch.add(beta * self._avg, pair, alpha=1.0 - beta)
        if opts["ema_init"] == "first":
            new = torch.where(lay.expand(self._pairs == 0), pair, new)
        torch.where(lay.expand(allow), new, self._avg, out=self._avg)   # in place
        self._pairs.add_(allow)
        if self.undamped:
            ss, so = lay.dots(w.s, w.sy_rows).unbind()
            res = Flat(None, {}, so, so, ss)
            gate = allow
        else:
            hy = [f.apply(v) for f, v in zip(self.factors, w.y_views)]
            torch.cat(lay.padded(hy), out=w.hy)
            res = self.damping.flat(w, [i.mu2 for i in infos])
            # the damped pair is not zeroed where not ok: the gate keeps it out of the update
            gate = allow & res.ok
        if norm is not None:   # P2: s^T y > eps ||s||^2 ||g_ref||, as s^T y - eps ... > 0
            gate = gate & (torch.addcmul(res.so, res.ss, norm, value=-opts["norm_gate_eps"]) > 0)
        accepted = type(self.factors[0]).update_many(self.factors, self.s_views, self.y_views,
                                                     list(gate.unbind()))
        self._rejected.add_(allow > torch.stack(accepted))    # allow and not accepted
        out = _Outcome(res, accepted, None if self.undamped else self.damping, lay.dtype)
        for i, e in enumerate(self.members):
            e._last = (out, i)


def _means_fit(dtype: torch.dtype, caps_lists: tuple) -> bool:
    """The capture means are ``dtype`` or widen to it exactly (a narrowing cast could
    overflow before the finiteness test)."""
    for caps in caps_lists:
        for c in caps:
            for t in (c.h_mean, c.g_mean):
                # (not torch.promote_types: that dispatches an op)
                if t is None or t.dim() != 1 or not (
                        t.dtype == dtype or (t.dtype.is_floating_point
                                             and t.dtype.itemsize < dtype.itemsize)):
                    return False
    return True
