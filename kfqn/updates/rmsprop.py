"""RMSprop as a first-order rule for every parameter the preconditioned layers do not take
(Tieleman & Hinton, 2012; the form of ``torch.optim.RMSprop``):

    g = grad + tau theta                            (weight_decay_mode 'inside')
    v <- alpha v + (1 - alpha) g^2                  (v = 0 at start)
    [centered: mu <- alpha mu + (1 - alpha) g, v_used = v - mu^2]
    u = g / (sqrt(v_used [/ (1 - alpha^t)]) + eps)  (bias correction optional, off in torch)
    b <- momentum(b, u)                             (the group's momentum and momentum_form:
                                                     'torch' is torch's buffer, 'ema' P2's EMA)
    theta <- theta - alpha_lr b   [- alpha_lr tau theta with weight_decay_mode 'outside']

With momentum 0 both momentum forms give b = u. P2's setting (docs/algorithms.md §4, (R)): alpha = 0.9,
momentum 0.9 as an EMA; torch's defaults: alpha = 0.99, eps = 1e-8, momentum 0.

Speed: float32/float64 parameters of the uncentred rule go through two of torch's fused kernels
(see ``RMSpropFallback._step_fused``), with the overflow bound and per-parameter skip flags of
:mod:`kfqn.updates.first_order`; centred RMSprop, an eps below ``MIN_FAST_EPS`` and other dtypes
take the exact path.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from kfqn.core.components import Option
from kfqn.core.momentum import initial_started, momentum_update
from kfqn.updates.first_order import (MIN_FAST_EPS, Entry, Fallback, admissible,
                                       kernel_steps, norms, skip_flags)


class RMSpropFallback(Fallback):
    name = "rmsprop"
    description = "RMSprop (torch form; momentum from the group, momentum_form applies)"
    options = {
        "alpha": Option(0.99, "decay of the squared-gradient average (P2: 0.9; torch: 0.99)",
                        type=float, low=0.0, high=1.0, open_high=True),
        "eps": Option(1.0e-8, "epsilon added to the root", type=float, low=0.0),
        "centered": Option(False, "divide by the centred second moment (v - mu^2)", type=bool),
        "bias_correction": Option(False, "divide v by 1 - alpha^t (not in torch)", type=bool),
    }

    def __init__(self, entries: list[tuple[str, nn.Parameter, dict]], config: Mapping[str, Any],
                 options: Mapping[str, Any]) -> None:
        super().__init__(entries, config, options)
        self.v: dict[str, Tensor] = {}
        self.mu: dict[str, Tensor] = {}
        self.buf: dict[str, Tensor] = {}
        self.started: dict[str, Tensor] = {}
        self.t: dict[str, Tensor] = {}
        for name, p, _ in entries:
            self.v[name] = torch.zeros_like(p)
            self.buf[name] = torch.zeros_like(p)
            if self.opts.get("centered", False):
                self.mu[name] = torch.zeros_like(p)
            self.started[name] = initial_started(config, p.device)
            self.t[name] = torch.zeros((), dtype=torch.long, device=p.device)
        self.track({"v": self.v, "buf": self.buf})

    @torch.no_grad()
    def step(self, ok: Tensor) -> None:
        eps = float(self.opts.get("eps", 1e-8))
        fast_rule = eps >= MIN_FAST_EPS and not self.opts.get("centered", False)
        buckets, exact = self.split(
            lambda group: fast_rule and 0.0 <= float(group["momentum"]) < 1.0,
            lambda name: (self.v[name], self.buf[name]))
        for bucket in buckets:
            self._step_fused(bucket, ok)
        self._step_exact(exact, ok)

    def _step_fused(self, bucket: list[Entry], ok: Tensor) -> None:
        """The buffer update is AdamW's parameter update with beta1 = 0 applied to the buffer
        b (``_fused_adamw_``, parameter := b, lr := -c, weight decay := (rho - 1) / c):

            b <- b (1 - lr wd) - lr g / (sqrt(v / bc) + eps) = rho b + c u,
            v <- alpha v + (1 - alpha) g^2                  (bc = 1 - alpha^t, or 1 at t = 1e30)

        with c = 1 - rho ('ema') or 1 ('torch'). A buffer that has not started is zero, so the
        'torch' form's first step is the same call (b = u); the 'ema' form's first accepted step
        (b = u) is a second call with rho = 0, c = 1, and the skip flags let exactly one of the
        two (or neither) run. The kernel's first moment (beta1 = 0) is a copy of g, written into
        g itself where g is a temporary (weight decay inside), else into a zeroed scratch. Then
        theta <- theta - lr (b + tau theta) is ``_fused_sgd_`` with momentum 0 and b as its
        gradient."""
        alpha, eps = float(self.opts.get("alpha", 0.99)), float(self.opts.get("eps", 1e-8))
        names, ps = [n for n, _, _ in bucket], [p for _, p, _ in bucket]
        group = bucket[0][2]
        rho, wd, lr = float(group["momentum"]), float(group["weight_decay"]), float(group["lr"])
        ema = self.config["momentum_form"] == "ema"
        c = 1.0 - rho if ema else 1.0
        inside = self.config["weight_decay_mode"] == "inside"
        wd_in, wd_out = (wd, 0.0) if inside else (0.0, wd)
        if wd_in:
            grads = torch._foreach_add([p.grad for p in ps], ps, alpha=wd_in)
            first_moments = grads
        else:
            grads = [p.grad for p in ps]
            scratch = torch.zeros(sum(g.numel() for g in grads), dtype=ps[0].dtype,
                                  device=ps[0].device)
            first_moments = [x.view_as(g) for x, g in
                             zip(scratch.split([g.numel() for g in grads]), grads)]
        vs, bufs = [self.v[n] for n in names], [self.buf[n] for n in names]
        g_n, p_n = norms(grads, ps if wd_out else [])
        v_n, b_n = self.state_bounds("v", names), self.state_bounds("buf", names)
        v_b = torch.addcmul(v_n * alpha, g_n, g_n, value=1.0 - alpha)   # |new v|
        b_b = torch.add(b_n * rho, g_n, alpha=max(c, 1.0) / eps)        # |new b|: |u| <= |g|/eps
        d_b = torch.add(b_b, p_n, alpha=wd_out) if wd_out else b_b
        run = admissible(ok, [g_n, v_b, b_b, d_b], ps[0].dtype)
        self.keep_bounds("v", names, v_n, v_b, run)
        self.keep_bounds("buf", names, b_n, b_b, run)
        t = torch.stack([self.t[n] for n in names])
        steps = kernel_steps(t, self.opts.get("bias_correction", False))
        started = torch.stack([self.started[n] for n in names])
        skip_run = skip_flags(run)
        if ema and rho:
            passes = [(-1.0, -1.0, skip_flags(run & ~started)),
                      (-c, (rho - 1.0) / c, skip_flags(run & started))]
        else:
            passes = [(-c, (rho - 1.0) / c, skip_run)]
        for lr_b, wd_b, skips in passes:
            for b, g, m, v, step, skip in zip(bufs, grads, first_moments, vs, steps, skips):
                torch._fused_adamw_([b], [g], [m], [v], [], [step], lr=lr_b, beta1=0.0,
                                    beta2=alpha, weight_decay=wd_b, eps=eps, amsgrad=False,
                                    maximize=False, grad_scale=None, found_inf=skip)
        for p, b, skip in zip(ps, bufs, skip_run):
            torch._fused_sgd_([p], [b], [], weight_decay=wd_out, momentum=0.0, lr=lr,
                              dampening=0.0, nesterov=False, maximize=False, is_first_step=False,
                              grad_scale=None, found_inf=skip)
        for n, count, s in zip(names, (t + run).unbind(0), (started | run).unbind(0)):
            self.t[n] = count
            self.started[n] = s

    def _step_exact(self, entries: list[Entry], ok: Tensor) -> None:
        form = self.config["momentum_form"]
        inside = self.config["weight_decay_mode"] == "inside"
        alpha, eps = float(self.opts.get("alpha", 0.99)), float(self.opts.get("eps", 1e-8))
        centered = self.opts.get("centered", False)
        for name, p, group in entries:
            wd = float(group["weight_decay"])
            grad = p.grad + wd * p if (inside and wd) else p.grad
            t = self.t[name] + 1
            v = alpha * self.v[name] + (1.0 - alpha) * grad * grad
            used = v
            mu = None
            if centered:
                mu = alpha * self.mu[name] + (1.0 - alpha) * grad
                used = v - mu * mu
            if self.opts.get("bias_correction", False):
                used = used / (1.0 - torch.pow(alpha, t.to(torch.float64))).to(p.dtype)
            u = grad / (used.sqrt() + eps)
            good = ok & torch.isfinite(u).all()
            buf = momentum_update(self.buf[name], u, self.started[name], float(group["momentum"]),
                                  form, good)
            direction = -buf
            if wd and not inside:
                direction = direction - wd * p
            good = good & torch.isfinite(direction).all()
            self.v[name] = torch.where(good, v, self.v[name])
            if mu is not None:
                self.mu[name] = torch.where(good, mu, self.mu[name])
            self.buf[name] = torch.where(good, buf, self.buf[name])
            self.started[name] = self.started[name] | good
            self.t[name] = torch.where(good, t, self.t[name])
            p.add_(torch.where(good, direction, torch.zeros_like(direction)), alpha=group["lr"])
        self.forget_bounds([name for name, _, _ in entries])

    def state_dict(self) -> dict[str, Any]:
        return {"v": dict(self.v), "mu": dict(self.mu), "buf": dict(self.buf),
                "started": dict(self.started), "t": dict(self.t)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, _, _ in self.entries:
            if name not in state["v"]:
                raise KeyError(name)
            self.v[name] = state["v"][name].to(self.v[name]).clone()
            if name in self.mu:
                self.mu[name] = state["mu"][name].to(self.mu[name]).clone()
            self.buf[name] = state["buf"][name].to(self.buf[name]).clone()
            self.started[name] = state["started"][name].to(self.started[name].device).clone()
            self.t[name] = state["t"][name].to(self.t[name].device).clone()
        self.forget_bounds([name for name, _, _ in self.entries])

    def state_bytes(self) -> int:
        """Bytes of the squared-gradient average, the centred mean and the momentum buffer."""
        return sum(t.numel() * t.element_size()
                   for d in (self.v, self.mu, self.buf) for t in d.values())
