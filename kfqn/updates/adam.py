"""Adam as a first-order rule for every parameter the preconditioned layers do not take
(Kingma & Ba, *Adam*, ICLR 2015, Algorithm 1; the ``adam`` preset has no preconditioned layer).

    g = grad + tau theta                        (weight_decay_mode 'inside'; torch.optim.Adam)
    m <- beta1 m + (1 - beta1) g,   v <- beta2 v + (1 - beta2) g^2     (m = v = 0 at start)
    theta <- theta - alpha (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
             [- alpha tau theta with weight_decay_mode 'outside': decoupled, torch.optim.AdamW]

beta1 is the param group's ``momentum`` unless given. P2's setting (SPEC §4): beta1 = beta2 =
0.9 with bias correction; torch's defaults: beta2 = 0.999, eps = 1e-8. t counts accepted steps
on the device; a non-finite step leaves parameters and moments unchanged.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from kfqn.core.components import Option
from kfqn.updates.first_order import Fallback


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

    def _beta1(self, group: dict) -> float:
        b1 = self.opts.get("beta1")
        return float(group["momentum"]) if b1 is None else float(b1)

    @torch.no_grad()
    def step(self, ok: Tensor) -> None:
        inside = self.config["weight_decay_mode"] == "inside"
        b2, eps = float(self.opts.get("beta2", 0.999)), float(self.opts.get("eps", 1e-8))
        for name, p, group in self.entries:
            if p.grad is None:
                continue
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

    def state_dict(self) -> dict[str, Any]:
        return {"m": dict(self.m), "v": dict(self.v), "t": dict(self.t)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, _, _ in self.entries:
            if name not in state["m"]:
                raise KeyError(name)
            self.m[name] = state["m"][name].to(self.m[name]).clone()
            self.v[name] = state["v"][name].to(self.v[name]).clone()
            self.t[name] = state["t"][name].to(self.t[name].device).clone()

    def state_bytes(self) -> int:
        """Bytes of the two moment buffers."""
        return _tensors({"m": self.m, "v": self.v})
