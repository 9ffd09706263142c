"""A counter-based random stream on the device, for samplers whose state must not move on a
skipped step.

K-FAC's true-Fisher G draws labels from the model inside the closure, before the optimizer knows
whether the step is finite. With ``torch.Generator`` a skipped step would still advance the
stream (and undoing that needs a host read of the finite flag). Here the draws are a pure
function of (seed, counter, index): ``counter`` is a device tensor that the estimator advances
only on accepted steps (``counter += ok``), so a skipped step leaves the next draws unchanged,
with no host synchronisation. The hash is SplitMix64's finaliser (Steele, Lea, Flood, *Fast
splittable pseudorandom number generators*, OOPSLA 2014) on int64 tensors with logical shifts.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB


def _signed(v: int) -> int:
    """A 64-bit pattern as the int64 value with the same bits."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def _lsr(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 bit patterns."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def mix64(x: Tensor) -> Tensor:
    """SplitMix64's finaliser (a bijection of 64-bit patterns; int64 arithmetic wraps)."""
    x = (x ^ _lsr(x, 30)) * _signed(_M1)
    x = (x ^ _lsr(x, 27)) * _signed(_M2)
    return x ^ _lsr(x, 31)


class CounterRNG:
    """Uniform, Bernoulli, categorical and normal draws from (seed, counter): the k-th call
    made on one instance gives the same numbers whenever seed and counter are the same."""

    def __init__(self, seed: int, counter: Tensor,
                 shard: tuple[int, int, int, int] | None = None) -> None:
        self.seed = _signed(int(seed))
        self.counter = counter
        self.calls = 0
        #: (rank, world, samples, m): this process holds samples m of each of ``samples``
        #: blocks of a global batch world * m, at position rank; its draws are the ones a single
        #: process would make for those rows (data-parallel runs equal one-process runs)
        self.shard = shard

    @property
    def device(self) -> torch.device:
        return self.counter.device

    def uniform(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> Tensor:
        """U[0, 1) of ``shape`` (53 random bits, then cast to ``dtype``)."""
        n = math.prod(shape)
        self.calls += 1
        key = mix64(self.counter.to(torch.int64) * _signed(_GOLDEN)
                    + _signed(self.seed * 0x100000001B3 + self.calls))
        idx = self._indices(n)
        bits = mix64(mix64(key + idx * _signed(_GOLDEN)))
        u = _lsr(bits, 11).to(torch.float64) * 2.0 ** -53
        return u.reshape(shape).to(dtype)

    def _indices(self, n: int) -> Tensor:
        """Positions of this call's n draws in the stream (see ``shard``)."""
        dev = self.device
        if self.shard is None:
            return torch.arange(n, dtype=torch.int64, device=dev)
        rank, world, samples, m = self.shard
        rest = n // (samples * m)
        s = torch.arange(samples, dtype=torch.int64, device=dev).view(-1, 1, 1)
        i = torch.arange(m, dtype=torch.int64, device=dev).view(1, -1, 1)
        j = torch.arange(rest, dtype=torch.int64, device=dev).view(1, 1, -1)
        return ((s * world * m + rank * m + i) * rest + j).reshape(-1)

    def bernoulli(self, p: Tensor) -> Tensor:
        return (self.uniform(p.shape, p.dtype) < p).to(p.dtype)

    def categorical(self, probs: Tensor) -> Tensor:
        """Indices (probs.shape[:-1]) drawn by inverse CDF from rows of ``probs``."""
        u = self.uniform(probs.shape[:-1], probs.dtype)
        cdf = probs.cumsum(-1)
        idx = (cdf < u.unsqueeze(-1) * cdf[..., -1:]).sum(-1)
        return idx.clamp_max(probs.shape[-1] - 1)

    def normal(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> Tensor:
        """N(0, 1) by Box-Muller."""
        u1 = self.uniform(shape, torch.float64)
        u2 = self.uniform(shape, torch.float64)
        z = torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos(2.0 * math.pi * u2)
        return z.to(dtype)
