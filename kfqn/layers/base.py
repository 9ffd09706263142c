"""Layer adapter contract (docs/algorithms.md §1-2).

An adapter wraps one module and turns what the capture hooks recorded into the quantities the
curvature estimators need, in homogeneous coordinates:

* ``abar`` = [a; 1] (or a without bias), one row per sample and spatial position t in T;
* ``Mbar`` = [grad W reshaped (d_g, d_a - 1), grad b], shape (d_g, d_a);
* per-sample pre-activation gradients g_{i,t} = m * d(mean loss)/d h_{i,t}.

All reductions are over the batch dimension (size m) and positions t; A-side reductions follow
docs/algorithms.md §2: ``A = (1/m) sum_i sum_t abar abar^T``.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from kfqn.core.components import Component


#: below this dimension a Gram matrix is one product; above, :func:`add_gram_` goes by blocks
GRAM_BLOCK_MIN = 768


def add_gram_(out: Tensor, a: Tensor, alpha: float, blocks: int = 4) -> Tensor:
    """out += alpha a^T a in place, for a of shape (n, d) and out (d, d) (possibly a view).

    On the CPU, for d >= ``GRAM_BLOCK_MIN``, only the block upper triangle is multiplied, row block i
    against columns i.., and mirrored: (blocks + 1) / (2 blocks) of the products of the full
    a^T a (5/8 for 4 blocks; about 25% less time on one core at d = 1000)."""
    d = a.shape[1]
    if d < GRAM_BLOCK_MIN or a.device.type != "cpu":  # on a GPU the extra launches cost more
        out.add_(a.T @ a, alpha=alpha)
        return out
    edges = [round(i * d / blocks) for i in range(blocks + 1)]
    for i in range(blocks):
        lo, hi = edges[i], edges[i + 1]
        rows = a[:, lo:hi].T @ a[:, lo:]                    # (hi - lo, d - lo)
        out[lo:hi, lo:].add_(rows, alpha=alpha)
        if hi < d:
            out[hi:, lo:hi].add_(rows[:, hi - lo:].T, alpha=alpha)
    return out


#: blocks of :class:`GramPlan` on the CPU for d >= ``GRAM_BLOCK_MIN``: 3 cost 6/9 of the full
#: product's flops and 3 ops per block (measured on one core, n = 1000: d = 1001 about 15-21 ms
#: against 30-36 ms full and 15-20 ms with 4 blocks; d = 785 about 10-12 against 13-22 ms)
GRAM_PLAN_BLOCKS = 3

_CONSTS: dict = {}


def cached_const(key: tuple, make) -> Tensor:
    """A device constant made once by ``make()`` and kept under ``key`` (outside inference
    mode, so that it can be used anywhere): no op dispatched per step for constants."""
    got = _CONSTS.get(key)
    if got is None:
        with torch.inference_mode(False):
            got = _CONSTS[key] = make()
    return got


def ones_column(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A cached (n, 1) column of ones: the homogeneous coordinate of n rows."""
    return cached_const(("ones_column", n, dtype, device),
                        lambda: torch.ones(n, 1, dtype=dtype, device=device))


class GramPlan:
    """out += alpha abar^T abar in place for a fixed (D, D) ``out`` (a state tensor updated in
    place), with the views of ``out`` that this needs built once here instead of every step.

    On the CPU for D >= ``GRAM_BLOCK_MIN`` only the block upper triangle is multiplied, block row
    i against the columns lo_i.. (one ``addmm_`` each), and the strict lower blocks are copies of
    their mirror images (one ``copy_`` each): the off-diagonal blocks of ``out`` stay exactly
    symmetric. Ops per call: 1 + (D >= GRAM_BLOCK_MIN: 1 split, blocks - 1 column slices,
    blocks ``addmm_``, blocks - 1 ``copy_``; else 1 ``addmm_``)."""

    def __init__(self, out: Tensor, blocks: int = GRAM_PLAN_BLOCKS) -> None:
        self.out = out
        d = out.shape[0]
        if d < GRAM_BLOCK_MIN or out.device.type != "cpu" or blocks < 2:
            self.edges = [0, d]
        else:
            self.edges = [round(i * d / blocks) for i in range(blocks + 1)]
        e = self.edges
        self.sizes = [hi - lo for lo, hi in zip(e[:-1], e[1:])]
        self.rows = [out[lo:hi, lo:] for lo, hi in zip(e[:-1], e[1:])]       # block rows
        self.mirrors = [(out[hi:, lo:hi], out[lo:hi, hi:].T)                  # (dst, src)
                        for lo, hi in zip(e[:-2], e[1:-1])]

    def valid_for(self, out: Tensor) -> bool:
        """Whether the plan's views are views of ``out`` (the same tensor object)."""
        return self.out is out

    def add_(self, abar: Tensor, alpha: float) -> Tensor:
        """out += alpha abar^T abar, for abar of shape (n, D)."""
        at = abar.T
        if len(self.rows) == 1:
            return self.out.addmm_(at, abar, alpha=alpha)
        lefts = at.split(self.sizes)                          # one op: every (b_i, n) block
        for lo, left, row in zip(self.edges, lefts, self.rows):
            row.addmm_(left, abar if lo == 0 else abar[:, lo:], alpha=alpha)
        for dst, src in self.mirrors:
            dst.copy_(src)
        return self.out


class LayerAdapter(Component):
    """Base adapter. Subclasses set ``module_types`` and implement the abstract methods."""

    module_types: ClassVar[tuple[type, ...]] = ()

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    # -- matching --------------------------------------------------------------------------
    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        """Whether this adapter is meant for ``module`` (by type)."""
        return isinstance(module, cls.module_types)

    @classmethod
    def unsupported_reason(cls, module: nn.Module) -> str | None:
        """Why a matching module cannot be preconditioned (e.g. groups > 1), or None."""
        return None

    @classmethod
    def examples(cls) -> list[tuple[nn.Module, tuple[int, ...]]]:
        """Small (module, input shape) cases for the component contract tests."""
        raise NotImplementedError(f"adapter {cls.name!r} provides no examples() for the contract tests")

    # -- shapes ----------------------------------------------------------------------------
    @property
    def has_bias(self) -> bool:
        return getattr(self.module, "bias", None) is not None

    @property
    def weight(self) -> Tensor:
        return self.module.weight

    @property
    def d_g(self) -> int:
        """Output dimension d_g (rows of Wbar)."""
        return self.module.weight.shape[0]

    @property
    def d_a(self) -> int:
        """Homogeneous input dimension d_a (columns of Wbar)."""
        return self.module.weight[0].numel() + int(self.has_bias)

    def params(self) -> list[nn.Parameter]:
        """The module's parameters this adapter claims: weight, then bias if any."""
        return [self.module.weight] + ([self.module.bias] if self.has_bias else [])

    def targets(self) -> list[Tensor]:
        """The tensors the direction of this block is added to, in :meth:`split`'s order: the
        parameters themselves, or views of them for a block of a module (one group of a
        grouped convolution)."""
        return self.params()

    def blocks(self, name: str) -> list[tuple[str, "LayerAdapter"]]:
        """The Kronecker blocks of the module, as (layer name, adapter) pairs: one block (the
        adapter itself) by default; an adapter for a module with several independent blocks
        (e.g. ``groups > 1``) returns one adapter per block, each handling its slice of the
        statistics and of the parameters (:meth:`targets`). Each block gets its own
        preconditioner, momentum and checkpoint entry."""
        return [(name, self)]

    # -- homogeneous matrices ---------------------------------------------------------------
    def homogeneous(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        """Wbar = [W reshaped (d_g, -1), b] for weights, gradients or directions."""
        w = weight.reshape(weight.shape[0], -1)
        if bias is None:
            return w
        return torch.cat([w, bias.reshape(-1, 1)], dim=1)

    def homogeneous_grad(self) -> Tensor:
        """Mbar: the homogeneous gradient of the current ``.grad`` fields."""
        b = self.module.bias.grad if self.has_bias else None
        return self.homogeneous(self.module.weight.grad, b)

    def homogeneous_weight(self) -> Tensor:
        """Wbar: the homogeneous parameter matrix."""
        b = self.module.bias.detach() if self.has_bias else None
        return self.homogeneous(self.module.weight.detach(), b)

    def split(self, mat: Tensor) -> list[Tensor]:
        """Split a (d_g, d_a) matrix back into tensors shaped like weight (and bias)."""
        w = mat[:, : self.d_a - int(self.has_bias)].reshape(self.module.weight.shape)
        if not self.has_bias:
            return [w]
        return [w, mat[:, -1].reshape(self.module.bias.shape)]

    # -- per-layer statistics (abstract) ----------------------------------------------------
    def positions(self, inp: Tensor) -> int:
        """|T|: spatial positions per sample for this input."""
        raise NotImplementedError

    def patches(self, inp: Tensor) -> Tensor:
        """abar for every sample and position: shape (m, |T|, d_a). Reference path (memory heavy)."""
        raise NotImplementedError

    def input_mean(self, inp: Tensor) -> Tensor:
        """v = mean over batch and positions of abar, shape (d_a,)."""
        raise NotImplementedError

    def input_covariance(self, inp: Tensor, chunk: int = 64) -> Tensor:
        """A = (1/m) sum_i sum_t abar_{i,t} abar_{i,t}^T, shape (d_a, d_a)."""
        d = self.d_a
        acc = torch.zeros(d, d, dtype=inp.dtype, device=inp.device)
        self.add_covariance_(acc, inp, 1.0 / inp.shape[0], chunk)
        return acc

    def add_covariance_(self, out: Tensor, inp: Tensor, alpha: float, chunk: int = 64,
                        mask: Tensor | None = None) -> Tensor:
        """out += alpha sum_i sum_t abar_{i,t} abar_{i,t}^T in place (no (d_a, d_a) temporary);
        ``out`` has ``inp``'s dtype. ``mask`` (0-dim bool tensor): where false, nothing is added
        (``inp`` may then be non-finite). Generic version: patches of ``chunk`` samples at a
        time."""
        d = self.d_a
        zero = torch.zeros((), dtype=inp.dtype, device=inp.device)
        for part in inp.split(chunk):
            p = self.patches(part).reshape(-1, d)
            if mask is not None:
                p = torch.where(mask, p, zero)
            add_gram_(out, p, alpha)
        return out

    def hessian_action(self, inp: Tensor, s: Tensor) -> Tensor:
        """(1/m) sum_i sum_t abar_{i,t} (abar_{i,t}^T s): the minibatch A times s (docs/algorithms.md §3, P1)."""
        raise NotImplementedError

    #: whether :meth:`homogeneous_rows` is cheap (a view or one concatenation of the input, no
    #: patch extraction); estimators then form A, v and A s from it in a few ops per layer
    cheap_rows: ClassVar[bool] = False

    def homogeneous_rows(self, inp: Tensor) -> Tensor:
        """abar for every sample and position as rows, shape (m |T|, d_a): ``patches(inp)``
        flattened. Meant for adapters with ``cheap_rows``; the others build the patches."""
        return self.patches(inp).reshape(-1, self.d_a)

    def output_mean(self, out: Tensor) -> Tensor:
        """Mean of the pre-activation h over batch and positions, shape (d_g,)."""
        raise NotImplementedError

    def grad_output_mean(self, grad_out: Tensor) -> Tensor:
        """Mean over batch and positions of g_{i,t} = m * dL/dh_{i,t}, shape (d_g,)."""
        raise NotImplementedError

    def per_sample_grad_outputs(self, grad_out: Tensor) -> Tensor:
        """g_{i,t} = m * dL/dh_{i,t} as (m, |T|, d_g)."""
        raise NotImplementedError
