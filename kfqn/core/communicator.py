"""How layer statistics are combined across data-parallel ranks.

A step's statistics are batch means (of abar abar^T, abar, h, g = m dL/dh, g g^T, the A-side
Hessian action, ...). With N ranks that each hold B/N samples of a global batch B, the mean over
the global batch is the mean of the N ranks' means, so every rank holds the same factors after
averaging them (equal shard sizes, as DistributedSampler gives). The optimizer injects one
:class:`Communicator` into every layer (:class:`kfqn.curvature.base.LayerContext` ``comm``):

* :class:`Communicator` -- one process; every call returns its input (no cost);
* :class:`TorchDistributed` -- torch.distributed: :meth:`mean_many` averages a list of tensors
  with one all-reduce of their flattened concatenation (in the widest of their dtypes),
  :meth:`sum_` sums a flat buffer in place (the owners' directions, ``placement: owner``).

One round per pass: after the closure, the optimizer averages in one call the h and g means the
capture hooks recorded, the non-finite flag and every statistic the layers' preconditioners
declared for that pass (:meth:`LayerPreconditioner.batch_means`); the preconditioners then read
the averaged values through :class:`ReducingAdapter`, which they see in place of the layer
adapter (its ``memo``). A statistic that was not declared is averaged when it is asked for (one
call more; correct, slower) -- except under ``placement: owner``, where the other ranks could
not take part and it is an error.
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

    def sum_(self, flat: Tensor) -> Tensor:
        return flat

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (host objects; outside the step)."""
        return [obj]

    #: collective calls made so far (for the tests and ``kfqn bench``)
    calls = 0
    bytes = 0


def _widest(tensors: list[Tensor]) -> torch.dtype:
    """The dtype all of ``tensors`` fit in without loss (floating point; float32 at least)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


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
        """Each tensor averaged over the ranks, with one all-reduce of their concatenation in the
        widest of their dtypes (a float32 mean is rounded once, from the float64 one)."""
        if not tensors:
            return []
        dtype = _widest(tensors)
        flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
        self._all_reduce(flat)
        flat = flat / self.world_size
        out, offset = [], 0
        for t in tensors:
            n = t.numel()
            out.append(flat[offset:offset + n].reshape(t.shape).to(t.dtype))
            offset += n
        return out

    def sum_(self, flat: Tensor) -> Tensor:
        """``flat`` summed over the ranks, in place (one all-reduce)."""
        self._all_reduce(flat)
        return flat

    def gather_objects(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self.dist.all_gather_object(out, obj, group=self.group)
        return out


class ReducingAdapter:
    """A layer adapter whose batch statistics are averaged over the ranks; everything else is
    the wrapped adapter's (attributes, shapes, per-sample quantities, parameters).

    ``memo`` holds the statistics averaged in this pass's round (method name or key -> the mean
    over the ranks); a statistic found there is not averaged again. ``strict`` (``placement:
    owner``): a statistic missing from the memo is an error instead of a collective call that
    the other ranks would not make."""

    #: adapter methods that return a batch mean of the layer's input or output
    MEANS = ("input_covariance", "input_mean", "output_mean", "grad_output_mean")

    def __init__(self, adapter: Any, comm: Communicator, name: str = "",
                 strict: bool = False) -> None:
        self._adapter = adapter
        self._comm = comm
        self._name = name
        self.strict = strict
        self.memo: dict[str, Tensor] = {}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._adapter, name)
        if name in self.MEANS and callable(attr):
            def reduced(*args: Any, **kwargs: Any) -> Tensor:
                return self.batch_mean(name, lambda: attr(*args, **kwargs))
            return reduced
        return attr

    def batch_mean(self, key: str, compute: Any) -> Tensor:
        """The mean over the ranks of ``compute()``: from this round's memo when declared."""
        if key in self.memo:
            return self.memo[key]
        if self.strict:
            from kfqn.core.errors import KfqnError
            raise KfqnError(
                f"layer {self._name!r}: placement=owner needs every batch statistic declared in "
                f"the preconditioner's batch_means(), but {key!r} was not; declare it there or "
                "use placement=replicated")
        return self._comm.mean(compute())

    def hessian_action(self, inp: Tensor, s: Tensor) -> Tensor:
        """(1/m) sum abar abar^T s averaged over the ranks: A s from this round's covariance
        when it was declared, else the ranks' actions averaged (one call)."""
        cov = self.memo.get("input_covariance")
        if cov is not None:
            return cov.to(s.dtype) @ s
        return self.batch_mean("hessian_action",
                               lambda: self._adapter.hessian_action(inp, s))

    def add_covariance_(self, out: Tensor, inp: Tensor, alpha: float, chunk: int = 64,
                        mask: Tensor | None = None) -> Tensor:
        """out += alpha * m * (the ranks' mean of (1/m) sum_i sum_t abar abar^T) where ``mask``
        (m: this rank's batch, as in the caller's alpha)."""
        cov = self.memo.get("input_covariance")
        if cov is not None:
            local = cov.to(out.dtype) * (alpha * inp.shape[0])
        else:
            local = torch.zeros_like(out)
            self._adapter.add_covariance_(local, inp, alpha, chunk, mask=mask)
            local = self.batch_mean("add_covariance", lambda: local)
        if mask is not None:
            local = torch.where(mask, local, torch.zeros((), dtype=out.dtype, device=out.device))
        return out.add_(local)
