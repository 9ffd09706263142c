"""First-order rule for parameters outside preconditioned layers (SPEC §3).

``momentum``: the same momentum direction, momentum form, weight decay and learning rate as the
preconditioned layers, without preconditioning. Non-finite steps leave parameters and buffers
unchanged (selected on the device).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from kfqn.core.components import Component
from kfqn.core.momentum import momentum_update


class Fallback(Component):
    """Base: updates a list of (name, parameter, param_group) entries."""

    def __init__(self, entries: list[tuple[str, nn.Parameter, dict]], config: Mapping[str, Any],
                 options: Mapping[str, Any]) -> None:
        self.entries = entries
        self.config = config
        self.opts = dict(options)

    @torch.no_grad()
    def step(self, ok: Tensor) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError


class MomentumFallback(Fallback):
    name = "momentum"
    description = "plain momentum direction with the group's lr, momentum and weight decay"

    def __init__(self, entries, config, options) -> None:
        super().__init__(entries, config, options)
        self.buf: dict[str, Tensor] = {}
        self.started: dict[str, Tensor] = {}
        for name, p, _ in entries:
            self.buf[name] = torch.zeros_like(p)
            self.started[name] = torch.zeros((), dtype=torch.bool, device=p.device)

    @torch.no_grad()
    def step(self, ok: Tensor) -> None:
        form = self.config["momentum_form"]
        inside = self.config["weight_decay_mode"] == "inside"
        for name, p, group in self.entries:
            if p.grad is None:
                continue
            wd = group["weight_decay"]
            grad = p.grad + wd * p if (inside and wd) else p.grad
            self.buf[name] = momentum_update(self.buf[name], grad, self.started[name],
                                             group["momentum"], form, ok)
            self.started[name] = self.started[name] | ok
            direction = -self.buf[name]
            if wd and not inside:
                direction = direction - wd * p
            good = ok & torch.isfinite(direction).all()
            p.add_(torch.where(good, direction, torch.zeros_like(direction)), alpha=group["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {"buf": dict(self.buf), "started": dict(self.started)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, _, _ in self.entries:
            if name not in state["buf"]:
                raise KeyError(name)
            self.buf[name] = state["buf"][name].to(self.buf[name]).clone()
            self.started[name] = state["started"][name].to(self.started[name].device).clone()
