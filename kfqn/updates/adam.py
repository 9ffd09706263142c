"""Adam as a first-order rule for every parameter the preconditioned layers do not take
(Kingma & Ba, *Adam*, ICLR 2015, Algorithm 1; the ``adam`` preset has no preconditioned layer).

    g = grad + tau theta                        (weight_decay_mode 'inside'; torch.optim.Adam)
    m <- beta1 m + (1 - beta1) g,   v <- beta2 v + (1 - beta2) g^2     (m = v = 0 at start)
    theta <- theta - alpha (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
             [- alpha tau theta with weight_decay_mode 'outside': decoupled, torch.optim.AdamW]

beta1 is the param group's ``momentum`` unless given. P2's setting (docs/algorithms.md §4): beta1 = beta2 =
0.9 with bias correction; torch's defaults: beta2 = 0.999, eps = 1e-8. t counts accepted steps
on the device; a non-finite step leaves parameters and moments unchanged.

Speed: float32/float64 parameters go through torch's fused Adam/AdamW kernel (one pass, as
``torch.optim.Adam(fused=True)``), with the overflow bound and per-parameter skip flag of
:mod:`kfqn.updates.first_order`; an eps below ``MIN_FAST_EPS`` and other dtypes take the exact
path.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from kfqn.core.components import Option
from kfqn.updates.first_order import (MIN_FAST_EPS, Entry, Fallback, admissible,
                                       kernel_steps, norms, skip_flags)


def _tensors(state: dict[str, dict[str, Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for d in state.values() for t in d.values())


class AdamFallback(Fallback):
    name = "adam"
    description = "Adam (bias-corrected moments; beta1 = the group's momentum unless set)"
    options = {
        "beta1": Option(None, "first-moment decay; null = the param group's momentum", type=float,
                        low=0.0, high=1.0, open_high=True, nullable=True),
        "beta2": Option(0.999, "second-moment decay (P2: 0.9; torch: 0.999)", type=float,
                        low=0.0, high=1.0, open_high=True),
        "eps": Option(1.0e-8, "epsilon added to sqrt(v_hat)", type=float, low=0.0),
        "bias_correction": Option(True, "divide the moments by 1 - beta^t", type=bool),
    }

    def __init__(self, entries: list[tuple[str, nn.Parameter, dict]], config: Mapping[str, Any],
                 options: Mapping[str, Any]) -> None:
        super().__init__(entries, config, options)
        self.m: dict[str, Tensor] = {}
        self.v: dict[str, Tensor] = {}
        self.t: dict[str, Tensor] = {}
        for name, p, _ in entries:
            self.m[name] = torch.zeros_like(p)
            self.v[name] = torch.zeros_like(p)
            self.t[name] = torch.zeros((), dtype=torch.long, device=p.device)
        self.track({"m": self.m, "v": self.v})

    def _beta1(self, group: dict) -> float:
        b1 = self.opts.get("beta1")
        return float(group["momentum"]) if b1 is None else float(b1)

    @torch.no_grad()
    def step(self, ok: Tensor) -> None:
        eps = float(self.opts.get("eps", 1e-8))
        buckets, exact = self.split(
            lambda group: eps >= MIN_FAST_EPS and 0.0 <= self._beta1(group) < 1.0,
            lambda name: (self.m[name], self.v[name]))
        for bucket in buckets:
            self._step_fused(bucket, ok)
        self._step_exact(exact, ok)

    def _step_fused(self, bucket: list[Entry], ok: Tensor) -> None:
        """``_fused_adam_`` (weight decay inside) or ``_fused_adamw_`` (outside) per parameter,
        skipped by its flag where ``ok`` is false or the step could overflow."""
        inside = self.config["weight_decay_mode"] == "inside"
        b2, eps = float(self.opts.get("beta2", 0.999)), float(self.opts.get("eps", 1e-8))
        names, ps = [n for n, _, _ in bucket], [p for _, p, _ in bucket]
        group = bucket[0][2]
        b1, wd, lr = self._beta1(group), float(group["weight_decay"]), float(group["lr"])
        wd_in, wd_out = (wd, 0.0) if inside else (0.0, wd)
        grads, ms, vs = [p.grad for p in ps], [self.m[n] for n in names], [self.v[n] for n in names]
        g_n, p_n = norms(grads, ps if wd else [])
        m_n, v_n = self.state_bounds("m", names), self.state_bounds("v", names)
        g_b = torch.add(g_n, p_n, alpha=wd_in) if wd_in else g_n   # |g + tau theta|
        m_b = torch.add(m_n * b1, g_b, alpha=1.0 - b1)            # |new m|
        v_b = torch.addcmul(v_n * b2, g_b, g_b, value=1.0 - b2)   # |new v|: |g^2| <= |g|^2
        # |direction| <= |new m| / (bias correction 1 - b1^t >= 1 - b1) / (denominator >= eps)
        d_b = m_b * (1.0 / ((1.0 - b1) * eps))
        if wd_out:
            d_b = torch.add(d_b, p_n, alpha=wd_out)
        run = admissible(ok, [g_b, m_b, v_b, d_b], ps[0].dtype)
        self.keep_bounds("m", names, m_n, m_b, run)
        self.keep_bounds("v", names, v_n, v_b, run)
        t = torch.stack([self.t[n] for n in names])
        steps = kernel_steps(t, self.opts.get("bias_correction", True))
        kernel = torch._fused_adam_ if inside else torch._fused_adamw_
        for p, g, m, v, step, skip in zip(ps, grads, ms, vs, steps, skip_flags(run)):
            kernel([p], [g], [m], [v], [], [step], lr=lr, beta1=b1, beta2=b2, weight_decay=wd,
                   eps=eps, amsgrad=False, maximize=False, grad_scale=None, found_inf=skip)
        for n, count in zip(names, (t + run).unbind(0)):
            self.t[n] = count

    def _step_exact(self, entries: list[Entry], ok: Tensor) -> None:
        inside = self.config["weight_decay_mode"] == "inside"
        b2, eps = float(self.opts.get("beta2", 0.999)), float(self.opts.get("eps", 1e-8))
        for name, p, group in entries:
            b1, wd = self._beta1(group), float(group["weight_decay"])
            grad = p.grad + wd * p if (inside and wd) else p.grad
            t = self.t[name] + 1
            m = b1 * self.m[name] + (1.0 - b1) * grad
            v = b2 * self.v[name] + (1.0 - b2) * grad * grad
            if self.opts.get("bias_correction", True):
                td = t.to(torch.float64)
                bc1 = (1.0 - torch.pow(b1, td)).to(p.dtype)
                bc2 = (1.0 - torch.pow(b2, td)).to(p.dtype)
                direction = -(m / bc1) / ((v.sqrt() / bc2.sqrt()) + eps)
            else:
                direction = -m / (v.sqrt() + eps)
            if wd and not inside:
                direction = direction - wd * p
            good = ok & torch.isfinite(direction).all()
            self.m[name] = torch.where(good, m, self.m[name])
            self.v[name] = torch.where(good, v, self.v[name])
            self.t[name] = torch.where(good, t, self.t[name])
            p.add_(torch.where(good, direction, torch.zeros_like(direction)), alpha=group["lr"])
        self.forget_bounds([name for name, _, _ in entries])

    def state_dict(self) -> dict[str, Any]:
        return {"m": dict(self.m), "v": dict(self.v), "t": dict(self.t)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, _, _ in self.entries:
            if name not in state["m"]:
                raise KeyError(name)
            self.m[name] = state["m"][name].to(self.m[name]).clone()
            self.v[name] = state["v"][name].to(self.v[name]).clone()
            self.t[name] = state["t"][name].to(self.t[name].device).clone()
        self.forget_bounds([name for name, _, _ in self.entries])

    def state_bytes(self) -> int:
        """Bytes of the two moment buffers."""
        return _tensors({"m": self.m, "v": self.v})
