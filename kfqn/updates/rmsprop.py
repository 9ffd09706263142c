"""RMSprop as a first-order rule for every parameter the preconditioned layers do not take
(Tieleman & Hinton, 2012; the form of ``torch.optim.RMSprop``):

    g = grad + tau theta                            (weight_decay_mode 'inside')
    v <- alpha v + (1 - alpha) g^2                  (v = 0 at start)
    [centered: mu <- alpha mu + (1 - alpha) g, v_used = v - mu^2]
    u = g / (sqrt(v_used [/ (1 - alpha^t)]) + eps)  (bias correction optional, off in torch)
    b <- momentum(b, u)                             (the group's momentum and momentum_form:
                                                     'torch' is torch's buffer, 'ema' P2's EMA)
    theta <- theta - alpha_lr b   [- alpha_lr tau theta with weight_decay_mode 'outside']

With momentum 0 both momentum forms give b = u. P2's setting (SPEC §4, (R)): alpha = 0.9,
momentum 0.9 as an EMA; torch's defaults: alpha = 0.99, eps = 1e-8, momentum 0.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from kfqn.core.components import Option
from kfqn.core.momentum import momentum_update
from kfqn.updates.first_order import Fallback


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
            self.started[name] = torch.zeros((), dtype=torch.bool, device=p.device)
            self.t[name] = torch.zeros((), dtype=torch.long, device=p.device)

    @torch.no_grad()
    def step(self, ok: Tensor) -> None:
        form = self.config["momentum_form"]
        inside = self.config["weight_decay_mode"] == "inside"
        alpha, eps = float(self.opts.get("alpha", 0.99)), float(self.opts.get("eps", 1e-8))
        centered = self.opts.get("centered", False)
        for name, p, group in self.entries:
            if p.grad is None:
                continue
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

    def state_bytes(self) -> int:
        """Bytes of the squared-gradient average, the centred mean and the momentum buffer."""
        return sum(t.numel() * t.element_size()
                   for d in (self.v, self.mu, self.buf) for t in d.values())
