"""Adapter for ``nn.Conv2d`` (docs/algorithms.md §1-2, P1): patches by im2col in (c_in, k_h, k_w) order.

Stride, padding (numbers or 'same'/'valid'), dilation and bias are handled; ``groups > 1`` and
non-zero padding modes are reported unsupported. The Hessian action and the input mean are
computed with convolutions, never materialising the (m, |T|, d_a) patch tensor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kfqn.layers.base import LayerAdapter
from kfqn.core.components import register


@register('layer_adapter')
class Conv2dAdapter(LayerAdapter):
    name = "conv2d"
    description = "nn.Conv2d (groups=1, zero padding; stride, padding, dilation, bias)"
    module_types = (nn.Conv2d,)

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        if module.groups != 1:
            return f"groups={module.groups} (only groups=1 is supported)"
        return cls.padding_reason(module)

    @staticmethod
    def padding_reason(module: nn.Module) -> str | None:
        """Why the padding cannot be handled (only zero padding is), or None."""
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (only 'zeros' is supported)"
        return None

    @classmethod
    def examples(cls) -> list[tuple[nn.Module, tuple[int, ...]]]:
        return [
            (nn.Conv2d(2, 3, 3), (4, 2, 6, 6)),
            (nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=False), (3, 2, 7, 5)),
            (nn.Conv2d(3, 2, (2, 3), stride=(1, 2), padding=(1, 0), dilation=(2, 1)), (2, 3, 6, 7)),
            (nn.Conv2d(2, 2, 3, padding="same", dilation=2), (2, 2, 5, 5)),
            (nn.Conv2d(2, 4, 1), (3, 2, 4, 4)),
        ]

    # -- geometry --------------------------------------------------------------------------
    def _prepare(self, inp: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Input padded explicitly for string paddings, and the numeric padding left to apply."""
        mod = self.module
        if isinstance(mod.padding, str):
            if mod.padding == "same":
                inp = F.pad(inp, mod._reversed_padding_repeated_twice)
            return inp, (0, 0)
        return inp, tuple(mod.padding)  # type: ignore[return-value]

    def _conv_kwargs(self, padding: tuple[int, int]) -> dict:
        mod = self.module
        return dict(stride=mod.stride, padding=padding, dilation=mod.dilation)

    def _out_hw(self, inp: Tensor) -> tuple[int, int]:
        x, pad = self._prepare(inp)
        mod = self.module
        out = []
        for i in range(2):
            size = x.shape[2 + i] + 2 * pad[i] - mod.dilation[i] * (mod.kernel_size[i] - 1) - 1
            out.append(size // mod.stride[i] + 1)
        return out[0], out[1]

    def positions(self, inp: Tensor) -> int:
        h, w = self._out_hw(inp)
        return h * w

    def patches(self, inp: Tensor) -> Tensor:
        x, pad = self._prepare(inp)
        mod = self.module
        cols = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=pad, stride=mod.stride)
        cols = cols.transpose(1, 2)  # (m, T, c_in*kh*kw)
        if self.has_bias:
            cols = torch.cat([cols, cols.new_ones(cols.shape[0], cols.shape[1], 1)], dim=2)
        return cols

    # -- statistics ------------------------------------------------------------------------
    def _weight_shape(self) -> tuple[int, int, int, int]:
        c_in = self.module.in_channels
        kh, kw = self.module.kernel_size
        return (1, c_in, kh, kw)

    def _correlate(self, x: Tensor, pad: tuple[int, int], z: Tensor) -> Tensor:
        """sum_{i,t} u_{i,t} z_{i,t} as a flat (c_in*kh*kw,) vector (a weight gradient)."""
        w = torch.nn.grad.conv2d_weight(x, self._weight_shape(), z, **self._conv_kwargs(pad))
        return w.reshape(-1)

    def input_mean(self, inp: Tensor) -> Tensor:
        # the correlation with a constant is linear in x: sum the batch first (m times less work)
        x, pad = self._prepare(inp)
        m = x.shape[0]
        h, w = self._out_hw(inp)
        ones = x.new_ones(1, 1, h, w)
        mean = self._correlate(x.sum(0, keepdim=True), pad, ones) / (m * h * w)
        if self.has_bias:
            mean = torch.cat([mean, mean.new_ones(1)])
        return mean

    def hessian_action(self, inp: Tensor, s: Tensor) -> Tensor:
        x, pad = self._prepare(inp)
        m = x.shape[0]
        sw = s[: self.d_a - int(self.has_bias)].reshape(self._weight_shape())
        sb = s[-1:] if self.has_bias else None
        z = F.conv2d(x, sw, sb, **self._conv_kwargs(pad))  # abar^T s per sample and position
        out = self._correlate(x, pad, z)
        if self.has_bias:
            out = torch.cat([out, z.sum().reshape(1)])
        return out / m

    def output_mean(self, out: Tensor) -> Tensor:
        return out.mean(dim=(0, 2, 3))

    def grad_output_mean(self, grad_out: Tensor) -> Tensor:
        return grad_out.mean(dim=(0, 2, 3)) * grad_out.shape[0]

    def per_sample_grad_outputs(self, grad_out: Tensor) -> Tensor:
        m, c = grad_out.shape[:2]
        return grad_out.reshape(m, c, -1).transpose(1, 2) * m
