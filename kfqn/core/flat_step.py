"""The direction and the move of every preconditioned layer of a param group in a few batched
operations (docs/algorithms.md §3; issue 11's op budget).

The per-layer state of the direction -- the momentum Mhat_l (d_g, d_a), the flag ``started_l``
and the counter ``dir_rejected_l`` -- lives in flat buffers, one set per param group and
device (a :class:`FlatBucket`); each layer's tensors are views of them, so the state is
updated in place at static addresses and checkpoints stay keyed by layer. One work buffer of
the same size holds first the homogeneous gradients and then the directions. Per step, with
``ok`` the step's device flag (loss and gradients finite)::

    G_l = [grad W_l, grad b_l] (+ tau [W_l, b_l], "inside", one add)      one copy for all
    Mhat_l <- k_l Mhat_l + c_l where(ok, G_l, 0)    two foreach ops; (k, c) = (rho, 1 - rho)
                                     started, (0, 1) first accepted step, (1, 0) not ok
    D_l^T = precondition_t(Mhat_l^T) (+ tau Wbar_l^T "outside")          the layer's products
    good_l = ok and sum(D_l) finite                                     one segmented sum
    theta_l <- theta_l + (-lr good_l) D_l    one foreach op (non-finite entries zeroed first)

Nothing as large as the parameters is allocated: the per-layer coefficients go to the
``torch._foreach_*`` ops as 0-dim tensors. Bit for bit the per-layer loop it replaces
(``KFQNOptimizer._precondition_and_move_layers``): every elementwise operation is the same
operation (``p + (-lr) d`` is ``p.add_(d, alpha=-lr)``), and each layer's products get the same
operands in the same layout (segments 64-byte aligned). Used when every layer of the bucket delivered statistics this step
and the parameters have the factor dtype; otherwise the optimizer runs the per-layer loop on the
same state views.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from kfqn.core.finite import const
from kfqn.layers.base import LayerAdapter

#: bytes to which each layer's segment of the flat buffers is aligned
ALIGN = 64

#: (rho, coef, dtype, device) -> the (3, 2) table of momentum coefficients (k, c) and a zero
_TABLES: dict = {}


def _table(rho: float, coef: float, dtype: torch.dtype, device: torch.device) -> tuple:
    key = (rho, coef, dtype, device)
    got = _TABLES.get(key)
    if got is None:
        with torch.inference_mode(False):
            got = (torch.tensor([[rho], [coef]], dtype=dtype, device=device),
                   torch.tensor([[0.0], [1.0]], dtype=dtype, device=device),
                   torch.tensor([[1.0], [0.0]], dtype=dtype, device=device),
                   torch.zeros((), dtype=dtype, device=device))
        _TABLES[key] = got
    return got


def _neg(lr: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """-lr as a cached 0-dim tensor."""
    return const(-lr, dtype, device)


def _is_view_of(t: Tensor, base: Tensor) -> bool:
    return t.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()


def _plain_homogeneous(adapter: LayerAdapter) -> bool:
    """The adapter builds Mbar with the base class's [W reshaped, b] (Linear, Conv2d)."""
    cls = type(adapter)
    return (cls.homogeneous is LayerAdapter.homogeneous
            and cls.homogeneous_grad is LayerAdapter.homogeneous_grad)


class FlatBucket:
    """The layers of one param group on one device, their direction state in flat buffers.

    ``layers`` are the optimizer's ``Layer`` records; on construction their ``momentum``,
    ``started`` and ``dir_rejected`` are copied into the buffers and replaced by views."""

    def __init__(self, layers: Sequence[Any], dtype: torch.dtype, device: torch.device) -> None:
        self.layers = list(layers)
        self.dtype, self.device = dtype, device
        sizes = [l.adapter.d_g * l.adapter.d_a for l in self.layers]
        # each layer's segment starts 64-byte aligned, as a tensor of its own would: BLAS
        # (MKL) rounds differently for operands at other alignments; the padding stays zero
        step = max(1, ALIGN // torch.empty((), dtype=dtype).element_size())
        padded = [-(-size // step) * step for size in sizes]
        n = sum(padded)
        self.lengths = torch.tensor(padded, dtype=torch.long, device=device)
        self.momentum = torch.zeros(n, dtype=dtype, device=device)
        self.work = torch.zeros(n, dtype=dtype, device=device)
        self.started = torch.zeros(len(sizes), dtype=torch.bool, device=device)
        self.dir_rejected = torch.zeros(len(sizes), dtype=torch.long, device=device)
        self.moms: list[Tensor] = []          # Mhat_l, (d_g, d_a) views of momentum
        self.grad_in: list[Tensor] = []       # G_l, (d_g, d_a) views of work
        self.grad_parts: list[Tensor] = []    # views of G_l shaped like the layer's targets
        self.mom_t: list[Tensor] = []         # Mhat_l^T, (d_a, d_g) views of momentum
        self.dir_t: list[Tensor] = []         # D_l^T, (d_a, d_g) views of work
        self.dir_parts: list[Tensor] = []     # views of D_l shaped like the layer's targets
        self.targets: list[Tensor] = []
        self.exact = True                     # every part is a view (else: the per-layer loop)
        offset = 0
        owners: list[int] = []
        for i, (layer, size, seg) in enumerate(zip(self.layers, sizes, padded)):
            d_g, d_a = layer.adapter.d_g, layer.adapter.d_a
            mom = self.momentum[offset:offset + size].view(d_g, d_a)
            mom.copy_(layer.momentum)
            self.started[i] = layer.started
            self.dir_rejected[i] = layer.dir_rejected
            layer.momentum = mom
            layer.started = self.started[i]
            layer.dir_rejected = self.dir_rejected[i]
            g_l = self.work[offset:offset + size].view(d_g, d_a)
            dt_l = self.work[offset:offset + size].view(d_a, d_g)
            self.moms.append(mom)
            self.grad_in.append(g_l)
            self.mom_t.append(mom.T)
            self.dir_t.append(dt_l)
            targets = layer.adapter.targets()
            g_parts = layer.adapter.split(g_l)
            d_parts = layer.adapter.split(dt_l.T)
            self.exact &= all(_is_view_of(t, self.work) for t in g_parts + d_parts)
            self.exact &= _plain_homogeneous(layer.adapter)
            self.exact &= all(t.shape == p.shape for t, p in zip(d_parts, targets))
            self.grad_parts += g_parts
            self.dir_parts += d_parts
            self.targets += targets
            owners += [i] * len(targets)
            offset += seg
        #: the layer of each target (to pick its step size)
        self.target_layer = torch.tensor(owners, dtype=torch.long, device=device)

    def covers(self, active_ids: set[int]) -> bool:
        """Whether every layer of the bucket is active this step (``active_ids``: ``id`` of
        each active layer) and its parameters suit the batched path."""
        return (self.exact and all(id(l) in active_ids for l in self.layers)
                and all(t.dtype == self.dtype and t.grad is not None for t in self.targets))

    def gather_grads(self) -> None:
        """G_l = [grad W reshaped (d_g, -1), grad b] into the work buffer: one copy into the
        views shaped like the parameters, for every layer of the bucket at once (the optimizer
        calls it before the step's finiteness test, which sums the buffer)."""
        torch._foreach_copy_(self.grad_parts, [t.grad for t in self.targets])

    def step(self, ok: Tensor, lr: float, rho: float, coef: float, wd: float,
             inside: bool, precondition_t: Sequence[Any]) -> None:
        """One step of every layer of the bucket after :meth:`gather_grads` (module docstring);
        ``precondition_t[i](Mhat_i^T, out)`` writes D_i^T into ``out``."""
        if wd and inside:
            torch._foreach_add_(self.grad_parts, self.targets, alpha=wd)
        started_kc, first_kc, skip_kc, zero = _table(rho, coef, self.dtype, self.device)
        # (k, c) of every layer as a (2, L) table, then 2L 0-dim tensors for the foreach ops
        # (no per-entry expansion: the buffers are as large as the parameters)
        kc = torch.where(ok, torch.where(self.started, started_kc, first_kc), skip_kc)
        kc = kc.view(-1).unbind()
        torch.where(ok, self.work, zero, out=self.work)
        torch._foreach_mul_(self.moms, kc[:len(self.moms)])
        torch._foreach_addcmul_(self.moms, self.grad_in, kc[len(self.moms):])
        self.started.bitwise_or_(ok)
        for prec, mt, dt in zip(precondition_t, self.mom_t, self.dir_t):
            prec(mt, dt)
        if wd and not inside:
            torch._foreach_add_(self.dir_parts, self.targets, alpha=wd)
        # all_finite per layer: the layer's sum is finite (conservative: an overflowing sum
        # of finite entries rejects too, as the per-layer loop does)
        sums = torch.segment_reduce(self.work, "sum", lengths=self.lengths)
        finite = (sums - sums) == 0
        good = finite & ok
        self.dir_rejected.add_(ok > good)
        # theta <- theta - lr D on the good layers: rejected ones scaled by 0 after their
        # non-finite entries are zeroed (-lr * D in one product: as add_(D, alpha=-lr))
        torch.nan_to_num_(self.work, nan=0.0, posinf=0.0, neginf=0.0)
        scale = torch.where(good, _neg(lr, self.dtype, self.device), zero)
        torch._foreach_addcmul_(self.targets, self.dir_parts,
                                scale.index_select(0, self.target_layer).unbind())
