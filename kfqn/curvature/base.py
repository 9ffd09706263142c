"""Contracts for the A-side and G-side curvature estimators of one layer.

The optimizer calls, per layer and step, in this order (docs/algorithms.md §3-4):

1. ``prepare(cap, info)`` on both sides, before the direction is formed (initialisation at
   iteration 0; for ``next_iterate`` pairs, the pair ending at this iterate);
2. ``apply`` to form P = -H_g Mhat H_a (G side: ``apply(M) = H_g M``; A side:
   ``apply(M) = M H_a``);
3. after the parameters moved: ``after_step(cap, info)`` on the A side;
4. with a trial pass: ``after_trial(cap, trial, info)`` on the G side; then ``after_step``.

``info.ok`` is a device bool: false when the loss or a gradient was non-finite, in which case
every state change must be a no-op (selected with ``torch.where``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import Tensor

from kfqn.core.components import Component
from kfqn.core.state_check import tensor_bytes
from kfqn.layers.base import LayerAdapter
from kfqn.layers.capture import Capture


#: a batch statistic declared by ``batch_means``: (layer adapter, capture) -> this rank's mean
BatchMean = Callable[[LayerAdapter, Any], Tensor]


def input_means(*methods: str) -> dict[str, BatchMean]:
    """``batch_means`` entries for adapter methods of the layer input (``input_mean``,
    ``input_covariance``), applied to the capture's ``inp``."""
    return {m: (lambda adapter, cap, m=m: getattr(adapter, m)(cap.inp)) for m in methods}


@dataclass
class LayerContext:
    """What an estimator knows about its layer and how to build its sub-components."""

    name: str
    adapter: LayerAdapter
    dtype: torch.dtype
    device: torch.device
    builder: Any  # kfqn.core.assembly.ComponentBuilder
    #: how batch statistics are averaged over data-parallel ranks (kfqn.core.communicator);
    #: ``adapter`` is then a ReducingAdapter that averages the adapter's batch means
    comm: Any = None
    #: ``placement`` of the optimizer config: 'replicated' (every rank updates every layer) or
    #: 'owner' (this layer's factors live on one rank; kfqn.core.placement)
    placement: str = "replicated"

    def batch_mean(self, key: str, compute: Callable[[], Tensor]) -> Tensor:
        """``compute()`` -- a batch mean of this rank's data -- averaged over the data-parallel
        ranks: this pass's reduced value when the preconditioner declared ``key`` in
        ``batch_means``, else one collective call (none in a single process)."""
        reducer = getattr(self.adapter, "batch_mean", None)
        return compute() if reducer is None else reducer(key, compute)

    def factor(self, section: Mapping[str, Any], dim: int):
        return self.builder.factor(section, dim, self.dtype, self.device)

    def damping(self, section: Mapping[str, Any]):
        return self.builder.component("damping", section)

    def inversion(self, section: Mapping[str, Any]):
        return self.builder.component("inversion", section)


@dataclass
class StepInfo:
    """Per-step scalars for one layer (python floats: no device sync)."""

    ok: Tensor
    step: int
    lam_a: float  # damping added to A (docs/algorithms.md §2-3: sqrt(lambda), conv split by option)
    mu2: float    # second damping constant of the G pair
    extra: dict = field(default_factory=dict)


class _Estimator(Component):
    #: the config section keys that name sub-components, and their kinds
    subcomponents: ClassVar[Mapping[str, str]] = {}
    #: whether :meth:`batch_means` declares every batch statistic the estimator averages over
    #: data-parallel ranks, so that ``placement: owner`` can run it (docs/algorithms.md §8)
    owner_placement: ClassVar[bool] = False

    def batch_means(self, phase: str, step: int) -> dict[str, BatchMean]:
        """The batch means of this rank's data that the estimator will ask for in ``phase``
        ('warm', 'current', 'trial'; 'moved': see
        :meth:`kfqn.preconditioners.base.LayerPreconditioner.batch_means`), keyed by adapter method name (``input_mean``,
        ``input_covariance``) or by the key it passes to ``ctx.batch_mean``; each maps (the
        layer adapter, the pass's capture) to the local value. Computed on every rank -- also on
        ranks that do not own the layer -- so they must not read the estimator's state."""
        return {}

    def __init__(self, ctx: LayerContext, options: Mapping[str, Any]) -> None:
        self.ctx = ctx
        self.opts = dict(options)
        self._stats: dict[str, Tensor] = {}

    def prepare(self, cap: Capture, info: StepInfo) -> None:
        """Before the direction: initialise, or absorb a pair that ends at this iterate."""

    def after_step(self, cap: Capture, info: StepInfo) -> None:
        """After the parameters moved."""

    # several layers at one call (same class and options; the default is the loop)
    @classmethod
    def prepare_group(cls, ests: list, caps: list, infos: list) -> None:
        for e, c, i in zip(ests, caps, infos):
            e.prepare(c, i)

    @classmethod
    def after_step_group(cls, ests: list, caps: list, infos: list) -> None:
        for e, c, i in zip(ests, caps, infos):
            e.after_step(c, i)

    def apply(self, m: Tensor) -> Tensor:
        raise NotImplementedError

    def apply_t(self, mt: Tensor) -> Tensor:
        """``apply(mt.T).T``: the same map on the transposed matrix (d_a, d_g).

        The optimizer preconditions in this layout: d_a is often odd (bias column, c_in k^2 + 1)
        and BLAS products whose output rows are that long run markedly slower than with d_g
        there. Override where the product can be arranged that way (e.g. ``m @ H^T``)."""
        return self.apply(mt.T).T

    def apply_t_into(self, mt: Tensor, out: Tensor) -> Tensor:
        """:meth:`apply_t` written into ``out`` (a preallocated (d_a, d_g) tensor), returned:
        the optimizer's batched direction writes every layer's result into one flat buffer
        (kfqn/core/flat_step.py). Override to save the copy."""
        return out.copy_(self.apply_t(mt))

    def stats(self) -> dict[str, Tensor]:
        """Scalars of the last step, as device tensors."""
        return dict(self._stats)

    def factors(self) -> dict[str, Tensor]:
        """Dense factors for analysis (e.g. {'H_a': ..., 'A': ...})."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def state_bytes(self) -> int:
        """Bytes held in optimizer state by this estimator."""
        return tensor_bytes(self.state_dict())


class WarmStartSum:
    """Sum of per-batch A over a forward-only warm-start pass (docs/algorithms.md §3):
    ``mean()`` = (1/N) sum over all N samples of sum_t abar abar^T, then the sum is cleared."""

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.count = 0

    def add(self, batch_a: Tensor, batch_size: int) -> None:
        """Absorb one batch's A = (1/m) sum_i sum_t abar abar^T of ``batch_size`` m samples."""
        weighted = batch_a * batch_size
        self.total = weighted if self.total is None else self.total + weighted
        self.count += batch_size

    def mean(self) -> Tensor | None:
        """The warm-start A (None if nothing was seen); resets the sum."""
        if self.total is None:
            return None
        out = self.total / self.count
        self.total, self.count = None, 0
        return out


class FirstBatchStart:
    """Bookkeeping of a factor started from "the first batch": the first *accepted* one.

    A skipped first step (non-finite loss or gradient) must not fix the start. The start is
    computed at the first step (masked to a finite stand-in where the batch was not usable) and
    recomputed at later steps while ``pending`` (device) may still be set: on the CPU, where
    reading it costs nothing, until it clears; on an accelerator no host read is made inside the
    step, so there the first step's start stands (a skipped first step then leaves the
    stand-in, lambda_A^{-1} I)."""

    def __init__(self, device: torch.device) -> None:
        self.pending = torch.ones((), dtype=torch.bool, device=device)
        self.tried = False
        #: the CPU read found the start taken: ``pending`` only clears, so no more reads
        self._settled = False

    def due(self) -> bool:
        if not self.tried:
            return True
        if self._settled or self.pending.device.type != "cpu":
            return False
        if bool(self.pending):
            return True
        self._settled = True
        return False

    def taken(self, good: Tensor) -> None:
        self.pending &= ~good
        self.tried = True

    def state_dict(self) -> dict[str, Any]:
        return {"pending": self.pending, "tried": self.tried}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        self._settled = False
        if state is None:  # checkpoints from before: the start was taken
            self.pending = torch.zeros_like(self.pending)
            self.tried = True
            return
        self.pending = state["pending"].to(self.pending.device).clone()
        self.tried = bool(state["tried"])


class AEstimator(_Estimator):
    """Input-side estimator: owns H_a (d_a x d_a); ``apply(M) = M H_a``."""

    needs_warm_start: bool = False

    def apply(self, m: Tensor) -> Tensor:
        """M H_a, for an estimator whose H_a is its inverse factor ``self.factor``."""
        return self.factor.apply(m.T).T

    def apply_t(self, mt: Tensor) -> Tensor:
        """H_a M^T = (M H_a)^T: with the default :meth:`apply`, H_a (symmetric) times M^T as
        one product, without the two transposes of the generic form."""
        if type(self).apply is AEstimator.apply:
            return self.factor.apply(mt)
        return super().apply_t(mt)

    def apply_t_into(self, mt: Tensor, out: Tensor) -> Tensor:
        """:meth:`apply_t` written into ``out``: with the default :meth:`apply`, the one
        product straight into it (``InverseFactor.apply_into``)."""
        if type(self).apply is AEstimator.apply and type(self).apply_t is AEstimator.apply_t:
            return self.factor.apply_into(mt, out)
        return super().apply_t_into(mt, out)

    def warm_accumulate(self, inp: Tensor) -> None:
        """Forward-only warm start: absorb one batch of inputs."""

    def warm_finish(self, lam_a: float) -> None:
        """End of the warm-start pass."""


class GEstimator(_Estimator):
    """Output-side estimator: owns H_g (d_g x d_g); ``apply(M) = H_g M``."""

    needs_trial_pass: bool = False

    def after_trial(self, cap: Capture, trial: Capture, info: StepInfo) -> None:
        """After the extra forward/backward at the trial point."""

    @classmethod
    def after_trial_group(cls, ests: list, caps: list, trials: list, infos: list) -> None:
        for e, c, t, i in zip(ests, caps, trials, infos):
            e.after_trial(c, t, i)
