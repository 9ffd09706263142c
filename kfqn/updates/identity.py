"""The identity "update rule": H stays I. With it on both sides a preset is momentum SGD."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kfqn.updates.base import InverseFactor
from kfqn.core.components import register


@register('factor_update')
class IdentityFactor(InverseFactor):
    name = "identity"
    description = "H = I always (switches preconditioning off on that side)"
    satisfies_secant = False

    def reset(self, h0: Tensor | None = None) -> None:
        pass

    def apply(self, v: Tensor) -> Tensor:
        return v

    def update(self, s: Tensor, y: Tensor, allow: Tensor | None = None) -> Tensor:
        return torch.zeros((), dtype=torch.bool, device=s.device)

    def state_dict(self) -> dict[str, Any]:
        return {"resets": self.resets}                # always 0: I is never non-finite

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load_resets(state)
