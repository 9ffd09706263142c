"""Momentum and weight decay shared by preconditioned layers and the first-order fallback.

SPEC §3: G = Mbar + tau * Wbar ("inside"); Mhat <- rho Mhat + (1 - rho) G ("ema") or
Mhat <- rho Mhat + G ("torch", dampening 0). Mhat starts at G on the first accepted step,
exactly as ``torch.optim.SGD(momentum=rho, dampening=1-rho or 0)`` initialises its buffer.
"""
from __future__ import annotations

import torch
from torch import Tensor


def momentum_update(buf: Tensor, grad: Tensor, started: Tensor, rho: float, form: str,
                    ok: Tensor) -> Tensor:
    """The new momentum buffer; unchanged where ``ok`` is false."""
    coef = (1.0 - rho) if form == "ema" else 1.0
    new = torch.where(started, rho * buf + coef * grad, grad)
    return torch.where(ok, new, buf)
