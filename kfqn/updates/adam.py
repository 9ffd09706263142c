"""Adam as a first-order rule for every parameter the preconditioned layers do not take
(Kingma & Ba, *Adam*, ICLR 2015, Algorithm 1; the ``adam`` preset has no preconditioned layer).

    g = grad + tau theta                        (weight_decay_mode 'inside'; torch.optim.Adam)
    m <- beta1 m + (1 - beta1) g,   v <- beta2 v + (1 - beta2) g^2     (m = v = 0 at start)
    theta <- theta - alpha (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
             [- alpha tau theta with weight_decay_mode 'outside': decoupled, torch.optim.AdamW]

beta1 is the param group's ``momentum`` unless given. P2's setting (docs/algorithms.md §4): beta1 = beta2 =
0.9 with bias correction; torch's defaults: beta2 = 0.999, eps = 1e-8. t counts accepted steps
on the device; a skipped step leaves parameters, moments and t unchanged.

The step is ``torch.optim.Adam`` (``AdamW`` with weight decay outside), fused where torch has the
kernel (:mod:`kfqn.updates.first_order`). ``bias_correction: false`` gives torch's step count the
value 1e30, at which beta^t = 0 for every beta < 1: its corrections 1 - beta^t are 1. eps is at
least the dtype's smallest normal number (:func:`~kfqn.updates.first_order.eps_for`).

Bound on |g|: g^2 (and so v) below :func:`~kfqn.updates.first_order.limit`, and the step
alpha |m| / ((1 - beta1^t) eps) <= alpha B / ((1 - beta1) eps) below it too (|m| <= B: m is an
average of past gradients).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from kfqn.core.components import Option
from kfqn.updates.first_order import Fallback, eps_for, limit

#: torch's step count without bias correction: beta^1e30 = 0, so 1 - beta^t = 1
NO_BIAS_CORRECTION = 1.0e30


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
        self.m: dict[str, Tensor] = {n: torch.zeros_like(p) for n, p, _ in entries}
        self.v: dict[str, Tensor] = {n: torch.zeros_like(p) for n, p, _ in entries}
        self.t = self.counter(torch.zeros((), dtype=torch.long))
        self.corrected = bool(self.opts.get("bias_correction", True))
        cls = torch.optim.Adam if config["weight_decay_mode"] == "inside" else torch.optim.AdamW
        self.make_optimizer(cls, lambda n, p: {"step": self._count(0, p), "exp_avg": self.m[n],
                                               "exp_avg_sq": self.v[n]})

    def _count(self, t: int | Tensor, p: Tensor) -> Tensor:
        """torch's step count for ``t`` accepted steps (float32; on the device where fused)."""
        device = p.device if self.fused else torch.device("cpu")
        step = torch.as_tensor(t if self.corrected else NO_BIAS_CORRECTION)
        return step.to(device=device, dtype=torch.float32).clone()

    def _beta1(self, group: dict) -> float:
        b1 = self.opts.get("beta1")
        return float(group["momentum"]) if b1 is None else float(b1)

    def settings(self, group: dict, dtype: torch.dtype) -> dict[str, Any]:
        return {"lr": float(group["lr"]),
                "betas": (self._beta1(group), float(self.opts.get("beta2", 0.999))),
                "eps": eps_for(self.opts.get("eps", 1e-8), dtype),
                "weight_decay": float(group["weight_decay"])}

    def bound(self, group: dict, dtype: torch.dtype) -> float:
        corr = 1.0 - self._beta1(group) if self.corrected else 1.0
        step = limit(dtype) * eps_for(self.opts.get("eps", 1e-8), dtype) * corr
        lr = float(group["lr"])
        return min(math.sqrt(limit(dtype)), step / lr if lr > 0 else math.inf)

    @torch.no_grad()
    def step(self, ok: Tensor) -> None:
        present, mask = self.present()
        if not any(present):
            return
        skip = self.skip_flag(ok, present)
        self.torch_step(skip)
        self.count(self.t, ~skip, mask)

    def state_dict(self) -> dict[str, Any]:
        return {"m": dict(self.m), "v": dict(self.v), "t": self.counter_state(self.t)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_tensors(self.m, state["m"], self.names)
        self.load_tensors(self.v, state["v"], self.names)
        self.load_counter(self.t, state["t"])
        for (_, p, _), t in zip(self.entries, self.t.unbind(0)):
            self.opt.state[p]["step"].copy_(self._count(t, p))

    def state_bytes(self) -> int:
        """Bytes of the two moment buffers."""
        return self.nbytes(self.m, self.v)
