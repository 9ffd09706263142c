"""Grouped and depthwise ``nn.Conv2d`` (``groups > 1``): one Kronecker block per group.

A convolution with G groups is G independent convolutions: group k maps input channels
[k c_in/G, (k+1) c_in/G) to output channels [k c_out/G, (k+1) c_out/G) with its own kernels
W_k (c_out/G, c_in/G, kh, kw) and bias b_k. Its Fisher block is block-diagonal over groups, so
each group gets its own factors (KFC, Grosse & Martens 2016, per group)::

    A_k = (1/m) sum_i sum_t abar_{i,t,k} abar_{i,t,k}^T,   abar_{i,t,k} = [patch of group k's
                                                               input channels; 1]
    G_k from g_{i,t} restricted to group k's output channels

with d_a = (c_in/G) kh kw (+1), d_g = c_out/G. Depthwise (c_in = G) gives d_a = kh kw (+1) and
d_g = c_out/G (the channel multiplier). Each group is a layer of its own for the optimizer
(named ``<module>.group<k>``: its own preconditioner, momentum and checkpoint entry); its
direction is added to its slice of the module's weight and bias. The statistics of group k are
those of :class:`~kfqn.layers.conv2d.Conv2dAdapter` on the input channels of the group.
"""
from __future__ import annotations

from torch import Tensor, nn

from kfqn.core.components import register
from kfqn.layers.conv2d import Conv2dAdapter


class _GroupBlock(Conv2dAdapter):
    """Group ``k`` of a grouped convolution, seen as a convolution of its own."""

    def __init__(self, module: nn.Conv2d, k: int) -> None:
        super().__init__(module)
        g = module.groups
        self.k = k
        self.c_in = module.in_channels // g
        self.c_out = module.out_channels // g
        self.ins = slice(k * self.c_in, (k + 1) * self.c_in)
        self.outs = slice(k * self.c_out, (k + 1) * self.c_out)

    # -- shapes and parameters -------------------------------------------------------------
    @property
    def d_g(self) -> int:
        return self.c_out

    @property
    def d_a(self) -> int:
        kh, kw = self.module.kernel_size
        return self.c_in * kh * kw + int(self.has_bias)

    def targets(self) -> list[Tensor]:
        w, b = self.module.weight, self.module.bias
        return [w[self.outs]] + ([b[self.outs]] if self.has_bias else [])

    def homogeneous_grad(self) -> Tensor:
        b = self.module.bias.grad[self.outs] if self.has_bias else None
        return self.homogeneous(self.module.weight.grad[self.outs], b)

    def homogeneous_weight(self) -> Tensor:
        b = self.module.bias.detach()[self.outs] if self.has_bias else None
        return self.homogeneous(self.module.weight.detach()[self.outs], b)

    def split(self, mat: Tensor) -> list[Tensor]:
        w = mat[:, : self.d_a - int(self.has_bias)].reshape(self.module.weight[self.outs].shape)
        return [w] + ([mat[:, -1]] if self.has_bias else [])

    # -- statistics: the parent's on this group's channels -----------------------------------
    def _weight_shape(self) -> tuple[int, int, int, int]:
        kh, kw = self.module.kernel_size
        return (1, self.c_in, kh, kw)

    def _prepare(self, inp: Tensor):
        return super()._prepare(inp[:, self.ins])

    def output_mean(self, out: Tensor) -> Tensor:
        return super().output_mean(out[:, self.outs])

    def grad_output_mean(self, grad_out: Tensor) -> Tensor:
        return super().grad_output_mean(grad_out[:, self.outs])

    def per_sample_grad_outputs(self, grad_out: Tensor) -> Tensor:
        return super().per_sample_grad_outputs(grad_out[:, self.outs])


@register("layer_adapter")
class GroupedConv2dAdapter(Conv2dAdapter):
    name = "conv2d_grouped"
    description = "nn.Conv2d with groups > 1 (depthwise included): one Kronecker block per group"
    module_types = (nn.Conv2d,)

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.Conv2d) and module.groups > 1

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        return cls.padding_reason(module)

    @classmethod
    def examples(cls) -> list[tuple[nn.Module, tuple[int, ...]]]:
        return [
            (nn.Conv2d(4, 6, 3, groups=2), (3, 4, 6, 6)),
            (nn.Conv2d(3, 6, 3, padding=1, groups=3, bias=False), (2, 3, 5, 5)),   # depthwise x2
            (nn.Conv2d(4, 4, (2, 3), stride=2, padding="valid", groups=4), (2, 4, 7, 7)),
        ]

    def blocks(self, name: str) -> list[tuple[str, Conv2dAdapter]]:
        return [(f"{name}.group{k}", _GroupBlock(self.module, k))
                for k in range(self.module.groups)]
