"""How layer statistics are combined across data-parallel ranks.

A step's statistics are batch means (of abar abar^T, abar, h, g = m dL/dh, g g^T, the A-side
Hessian action, ...). With N ranks that each hold B/N samples of a global batch B, the mean over
the global batch is the mean of the N ranks' means, so every rank holds the same factors after
averaging them (equal shard sizes, as DistributedSampler gives). The optimizer injects one
:class:`Communicator` into every layer (:class:`kfqn.curvature.base.LayerContext` ``comm``):

* :class:`Communicator` -- one process; every call returns its input (no cost);
* :class:`TorchDistributed` -- torch.distributed: :meth:`mean_many` averages a list of tensors
  with one all-reduce of their flattened concatenation, :meth:`all_ok` ANDs a device flag.

Statistics that the adapters compute (covariances, input means, Hessian actions) are averaged by
:class:`ReducingAdapter`, which the preconditioners see in place of the layer adapter; the means
the capture hooks record (h and g means of every layer) and the finite flag are averaged by the
optimizer in one call per pass (:meth:`kfqn.core.optimizer.KFQNOptimizer._collect_statistics`);
preconditioners that form other batch statistics (K-FAC's G, EKFAC's scaling) call
``ctx.comm.mean`` on them.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class Communicator:
    """A single process: nothing to combine."""

    rank = 0
    world_size = 1

    def mean(self, t: Tensor) -> Tensor:
        return t

    def mean_many(self, tensors: list[Tensor]) -> list[Tensor]:
        return tensors

    def all_ok(self, flag: Tensor) -> Tensor:
        return flag

    def sum_int(self, value: int) -> int:
        return value

    #: collective calls made so far (for the tests and ``kfqn bench``)
    calls = 0
    bytes = 0


class TorchDistributed(Communicator):
    """Averages over the ranks of a ``torch.distributed`` process group (default: WORLD)."""

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            from kfqn.core.errors import KfqnError
            raise KfqnError("torch.distributed is not initialised: call "
                            "torch.distributed.init_process_group first (or launch with "
                            "torchrun / kfqn train --nproc N)")
        self.dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.calls = 0
        self.bytes = 0

    def _all_reduce(self, flat: Tensor) -> None:
        self.calls += 1
        self.bytes += flat.numel() * flat.element_size()
        self.dist.all_reduce(flat, group=self.group)

    def mean(self, t: Tensor) -> Tensor:
        return self.mean_many([t])[0]

    def mean_many(self, tensors: list[Tensor]) -> list[Tensor]:
        """Each tensor averaged over the ranks, with one all-reduce per dtype."""
        out: list[Tensor | None] = [None] * len(tensors)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(tensors):
            by_dtype.setdefault(t.dtype, []).append(i)
        for dtype, idx in by_dtype.items():
            flat = torch.cat([tensors[i].reshape(-1) for i in idx])
            self._all_reduce(flat)
            flat = flat / self.world_size
            offset = 0
            for i in idx:
                n = tensors[i].numel()
                out[i] = flat[offset:offset + n].reshape(tensors[i].shape)
                offset += n
        return out  # type: ignore[return-value]

    def all_ok(self, flag: Tensor) -> Tensor:
        """True on every rank only if it is true on every rank (one all-reduce)."""
        bad = (~flag).to(torch.float32).reshape(1)
        self._all_reduce(bad)
        return bad[0] == 0

    def sum_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        self._all_reduce(t)
        return int(t[0])


class ReducingAdapter:
    """A layer adapter whose batch statistics are averaged over the ranks; everything else is
    the wrapped adapter's (attributes, shapes, per-sample quantities, parameters)."""

    #: adapter methods that return a batch mean
    MEANS = ("input_covariance", "input_mean", "hessian_action", "output_mean",
             "grad_output_mean")

    def __init__(self, adapter: Any, comm: Communicator) -> None:
        self._adapter = adapter
        self._comm = comm

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._adapter, name)
        if name in self.MEANS and callable(attr):
            comm = self._comm

            def reduced(*args: Any, **kwargs: Any) -> Tensor:
                return comm.mean(attr(*args, **kwargs))
            return reduced
        return attr

    def add_covariance_(self, out: Tensor, inp: Tensor, alpha: float, chunk: int = 64,
                        mask: Tensor | None = None) -> Tensor:
        """out += alpha * (the ranks' mean of sum_i sum_t abar abar^T) where ``mask``."""
        local = torch.zeros_like(out)
        self._adapter.add_covariance_(local, inp, alpha, chunk, mask=mask)
        local = self._comm.mean(local)
        if mask is not None:
            local = torch.where(mask, local, torch.zeros((), dtype=out.dtype, device=out.device))
        return out.add_(local)
