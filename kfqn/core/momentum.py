"""Momentum and weight decay shared by preconditioned layers and the first-order fallback.

docs/algorithms.md §3: G = Mbar + tau * Wbar ("inside"); Mhat <- rho Mhat + (1 - rho) G
("ema") or Mhat <- rho Mhat + G ("torch", dampening 0).

Start (``momentum_init``): ``zero`` (default, the P2 authors' code): Mhat_0 = 0, so the first
buffer is (1 - rho) G_1 in the EMA form; ``first``: Mhat starts at G on the first accepted step,
exactly as ``torch.optim.SGD(momentum=rho, dampening=1-rho or 0)`` initialises its buffer.
Both are one code path: a zero buffer that counts as already "started" is the zero start.
"""
from __future__ import annotations

import torch
from torch import Tensor


def initial_started(config: dict, device: torch.device | str) -> Tensor:
    """The device flag ``started`` of a fresh (zero) momentum buffer: true for
    ``momentum_init: zero`` (the zero buffer is the start), false for ``first``."""
    return torch.tensor(config.get("momentum_init", "zero") == "zero", device=device)


def momentum_update(buf: Tensor, grad: Tensor, started: Tensor, rho: float, form: str,
                    ok: Tensor) -> Tensor:
    """The new momentum buffer; unchanged where ``ok`` is false."""
    coef = (1.0 - rho) if form == "ema" else 1.0
    new = torch.where(started, rho * buf + coef * grad, grad)
    return torch.where(ok, new, buf)


def momentum_update_(buf: Tensor, grad: Tensor, started: Tensor, rho: float, form: str,
                     ok: Tensor) -> Tensor:
    """:func:`momentum_update` in place on ``buf`` (returned): buf <- k buf + c grad with the
    0-dim coefficients k = rho, c = coef on a started accepted step; k = 0, c = 1 on the first
    accepted step; k = 1, c = 0 (and a zeroed grad, which may be non-finite) where not ``ok``."""
    coef = (1.0 - rho) if form == "ema" else 1.0
    started_kg, first_kg, skip_kg, zero = _coefficients(rho, coef, buf.dtype, buf.device)
    keep, gain = torch.where(ok, torch.where(started, started_kg, first_kg), skip_kg).unbind()
    return buf.mul_(keep).addcmul_(torch.where(ok, grad, zero), gain)


#: (rho, coef, dtype, device) -> the cached (k, c) pairs of momentum_update_ and a zero
_COEFFICIENTS: dict = {}


def _coefficients(rho: float, coef: float, dtype: torch.dtype,
                  device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Read-only device constants (k, c) = (rho, coef), (0, 1), (1, 0), and a 0-dim zero."""
    key = (rho, coef, dtype, device)
    got = _COEFFICIENTS.get(key)
    if got is None:
        with torch.inference_mode(False):
            got = tuple(torch.tensor(v, dtype=dtype, device=device)
                        for v in ([rho, coef], [0.0, 1.0], [1.0, 0.0], 0.0))
        _COEFFICIENTS[key] = got
    return got
