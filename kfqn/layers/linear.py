"""Adapter for ``nn.Linear``: inputs (m, *, d_in), outputs (m, *, d_out).

Extra leading dimensions after the batch dimension count as positions t (|T| = their product),
so a Linear layer applied to sequences is handled like a 1x1 convolution.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kfqn.layers.base import LayerAdapter, add_gram_, cached_const, ones_column
from kfqn.core.components import register


@register('layer_adapter')
class LinearAdapter(LayerAdapter):
    name = "linear"
    description = "nn.Linear (bias or not; extra input dimensions act as positions)"
    module_types = (nn.Linear,)

    @classmethod
    def examples(cls) -> list[tuple[nn.Module, tuple[int, ...]]]:
        return [(nn.Linear(5, 4), (6, 5)), (nn.Linear(3, 2, bias=False), (4, 3)),
                (nn.Linear(4, 3), (3, 2, 4))]

    cheap_rows = True

    def _rows(self, inp: Tensor) -> Tensor:
        # a 2-D input is its own rows: no reshape (a reshape dispatches a view op)
        return inp if inp.dim() == 2 else inp.reshape(-1, inp.shape[-1])

    def homogeneous_rows(self, inp: Tensor) -> Tensor:
        """abar = [a, 1] as (m |T|, d_a): one concatenation with a cached column of ones."""
        a = self._rows(inp)
        if not self.has_bias:
            return a
        return torch.cat([a, ones_column(a.shape[0], a.dtype, a.device)], dim=1)

    def positions(self, inp: Tensor) -> int:
        return math.prod(inp.shape[1:-1])   # from the shape: no op dispatched

    def patches(self, inp: Tensor) -> Tensor:
        m = inp.shape[0]
        a = inp.reshape(m, -1, inp.shape[-1])
        if self.has_bias:
            a = torch.cat([a, a.new_ones(a.shape[0], a.shape[1], 1)], dim=2)
        return a

    def input_mean(self, inp: Tensor) -> Tensor:
        mean = self._rows(inp).mean(0)
        if self.has_bias:
            one = cached_const(("one", mean.dtype, mean.device),
                               lambda: torch.ones(1, dtype=mean.dtype, device=mean.device))
            mean = torch.cat([mean, one])
        return mean

    def add_covariance_(self, out: Tensor, inp: Tensor, alpha: float, chunk: int = 0,
                        mask: Tensor | None = None) -> Tensor:
        a = self._rows(inp)
        n = a.new_full((), float(a.shape[0]))
        if mask is not None:
            zero = torch.zeros((), dtype=a.dtype, device=a.device)
            a, n = torch.where(mask, a, zero), torch.where(mask, n, zero)
        d = a.shape[1]
        add_gram_(out[:d, :d], a, alpha)
        if self.has_bias:
            s = a.sum(0)
            out[:d, d].add_(s, alpha=alpha)
            out[d, :d].add_(s, alpha=alpha)
            out[d, d].add_(n, alpha=alpha)
        return out

    def hessian_action(self, inp: Tensor, s: Tensor) -> Tensor:
        m = inp.shape[0]
        a = self._rows(inp)
        if self.has_bias:
            z = a @ s[:-1] + s[-1]
            return torch.cat([a.T @ z, z.sum().reshape(1)]) / m
        return a.T @ (a @ s) / m

    def output_mean(self, out: Tensor) -> Tensor:
        return self._rows(out).mean(0)

    def grad_output_mean(self, grad_out: Tensor) -> Tensor:
        if grad_out.dim() == 2:  # m * mean = the sum over the batch, in one op
            return grad_out.sum(0)
        return self._rows(grad_out).mean(0) * grad_out.shape[0]

    def per_sample_grad_outputs(self, grad_out: Tensor) -> Tensor:
        m = grad_out.shape[0]
        return grad_out.reshape(m, -1, grad_out.shape[-1]) * m
