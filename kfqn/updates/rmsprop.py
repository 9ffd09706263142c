"""RMSprop as a first-order rule for every parameter the preconditioned layers do not take
(Tieleman & Hinton, 2012; the form of ``torch.optim.RMSprop``):

    g = grad + tau theta                            (weight_decay_mode 'inside')
    v <- alpha v + (1 - alpha) g^2                  (v = 0 at start)
    [centered: mu <- alpha mu + (1 - alpha) g, v_used = max(v - mu^2, 0)]
    u = g / (sqrt(v_used [/ (1 - alpha^t)]) + eps)  (bias correction optional, off in torch)
    b <- momentum(b, u)                             (the group's momentum and momentum_form:
                                                     'torch' is torch's buffer, 'ema' P2's EMA)
    theta <- theta - alpha_lr b   [- alpha_lr tau theta with weight_decay_mode 'outside']

With momentum 0 both momentum forms give b = u, which (as in torch) is not stored: the buffer
keeps its value. P2's setting (docs/algorithms.md §4, (R)): alpha = 0.9, momentum 0.9 as an
EMA; torch's defaults: alpha = 0.99, eps = 1e-8, momentum 0.

torch.optim.RMSprop has no EMA momentum form, no bias correction, no fused kernel and no
``found_inf``, so the step is torch's foreach RMSprop written out with ``torch._foreach_*``
operations in torch's order: the 'torch' form (momentum or none, centred or not) equals
``torch.optim.RMSprop`` bit for bit (tests/test_first_order.py); the 'ema' form is
b <- rho b + ((1 - rho) g) / denom. The skip flag of :mod:`kfqn.updates.first_order` enters
branch-free: g is zeroed where the step is skipped (so every term it adds is 0) and the factors
of v, mu, b and theta are 1 there, an exact no-op without a host read. eps is at least the
dtype's smallest normal number.

Bound on |g|: g^2 (v) below :func:`~kfqn.updates.first_order.limit`; |b| <= growth U (growth
1 for 'ema', 1 / (1 - rho) for 'torch') and the step lr |b| below it too, where |u| <= U:
uncentred, v >= (1 - alpha) g^2 gives |u| <= 1 / sqrt(1 - alpha) (2 / sqrt(1 - alpha) with
room for rounding) unless (1 - alpha) g^2 is below the dtype's smallest normal number, where
|u| <= |g| / eps is tiny; centred (v - mu^2 may vanish), |u| <= B / eps.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from kfqn.core.components import Option
from kfqn.core.momentum import initial_started
from kfqn.updates.first_order import Fallback, eps_for, full, limit, pick


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
        self.ema = config["momentum_form"] == "ema"
        self.inside = config["weight_decay_mode"] == "inside"
        self.alpha = float(self.opts.get("alpha", 0.99))
        self.centered = bool(self.opts.get("centered", False))
        self.first = config.get("momentum_init", "zero") == "first"
        self.v: dict[str, Tensor] = {n: torch.zeros_like(p) for n, p, _ in entries}
        self.mu: dict[str, Tensor] = ({n: torch.zeros_like(p) for n, p, _ in entries}
                                      if self.centered else {})
        self.buf: dict[str, Tensor] = {n: torch.zeros_like(p) for n, p, _ in entries}
        self.started = self.counter(initial_started(config, self.device))
        self.t = self.counter(torch.zeros((), dtype=torch.long))

    def bound(self, group: dict, dtype: torch.dtype) -> float:
        rho, lr = float(group["momentum"]), float(group["lr"])
        eps = eps_for(self.opts.get("eps", 1e-8), dtype)
        growth = (1.0 if self.ema else 1.0 / (1.0 - rho)) * max(lr, 1.0)
        root = math.sqrt(limit(dtype))
        if not self.centered:
            u = max(2.0 / math.sqrt(1.0 - self.alpha),
                    math.sqrt(torch.finfo(dtype).tiny / (1.0 - self.alpha)) / eps)
            if growth * u <= limit(dtype):
                return root
        return min(root, limit(dtype) * eps / growth)

    @torch.no_grad()
    def step(self, ok: Tensor) -> None:
        present, mask = self.present()
        if not any(present):
            return
        skip = self.skip_flag(ok, present)
        run = ~skip
        for (group, dtype, _), idx in zip(self.buckets, present):
            if idx:
                self._step(group, idx, run)
        self.count(self.t, run, mask)
        self.count(self.started, run, mask)

    def _step(self, group: dict, idx: list[int], run: Tensor) -> None:
        """torch's foreach RMSprop, each operation gated: g is zeroed where skipped (so that the
        terms it adds vanish) and the factors of v, mu, b and theta are 1 there."""
        names = [self.names[i] for i in idx]
        ps = [self.entries[i][1] for i in idx]
        like = ps[0]
        rho, wd, lr = float(group["momentum"]), float(group["weight_decay"]), float(group["lr"])
        eps = eps_for(self.opts.get("eps", 1e-8), like.dtype)
        skip = ~run.to(like.device)
        if wd and self.inside:
            gs = torch._foreach_add([p.grad for p in ps], ps, alpha=wd)
            for g in gs:
                g.masked_fill_(skip, 0.0)
        else:
            gs = [p.grad.masked_fill(skip, 0.0) for p in ps]
        vs = [self.v[n] for n in names]
        torch._foreach_mul_(vs, pick(run, self.alpha, 1.0, like))
        torch._foreach_addcmul_(vs, gs, gs, value=1.0 - self.alpha)
        used = vs
        if self.centered:
            mus = [self.mu[n] for n in names]
            torch._foreach_lerp_(mus, gs, [pick(run, 1.0 - self.alpha, 0.0, like)] * len(mus))
            used = torch._foreach_addcmul(vs, mus, mus, value=-1.0)
            torch._foreach_clamp_min_(used, 0.0)   # v - mu^2 >= 0 but for rounding
        if self.opts.get("bias_correction", False):
            t = torch.stack([self.t[i] for i in idx]).to(like.device, torch.float64) + 1.0
            used = torch._foreach_div(used, list((1.0 - self.alpha ** t).to(like.dtype)
                                                 .unbind(0)))
        denom = torch._foreach_sqrt(used)
        torch._foreach_add_(denom, eps)
        if wd and not self.inside:
            torch._foreach_mul_(ps, pick(run, 1.0 - lr * wd, 1.0, like))
        if not rho:  # b = u, no buffer kept (as torch): theta + (-lr g) / denom
            torch._foreach_addcdiv_(ps, gs, denom, value=-lr)
            return
        bufs = [self.buf[n] for n in names]
        c = 1.0 - rho if self.ema else 1.0
        if not self.first:  # b <- rho b + c u (1 b + 0 where skipped)
            torch._foreach_mul_(bufs, pick(run, rho, 1.0, like))
            torch._foreach_addcdiv_(bufs, gs, denom, value=c)
        else:  # per entry: k, c = rho, c started; 0, 1 at the first accepted step; 1, any skipped
            started = self.started.to(like.device)
            k = torch.where(run.to(like.device), torch.where(started, full(rho, like),
                                                             full(0.0, like)),
                            full(1.0, like)).unbind(0)
            torch._foreach_mul_(bufs, [k[i] for i in idx])
            if c == 1.0:
                torch._foreach_addcdiv_(bufs, gs, denom)
            else:
                c = torch.where(started, full(c, like), full(1.0, like)).unbind(0)
                torch._foreach_addcdiv_(bufs, torch._foreach_mul(gs, [c[i] for i in idx]), denom)
        torch._foreach_addcmul_(ps, bufs, [pick(run, -lr, 0.0, like)] * len(ps))

    def state_dict(self) -> dict[str, Any]:
        return {"v": dict(self.v), "mu": dict(self.mu), "buf": dict(self.buf),
                "started": self.counter_state(self.started), "t": self.counter_state(self.t)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_tensors(self.v, state["v"], self.names)
        self.load_tensors(self.mu, state["mu"], self.mu)
        self.load_tensors(self.buf, state["buf"], self.names)
        self.load_counter(self.started, state["started"])
        self.load_counter(self.t, state["t"])

    def state_bytes(self) -> int:
        """Bytes of the squared-gradient average, the centred mean and the momentum buffer."""
        return self.nbytes(self.v, self.mu, self.buf)
