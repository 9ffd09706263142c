"""The contract of a layer preconditioner: one object per layer and method family that owns
every factor of that layer (docs/algorithms.md §3-4).

The optimizer (:mod:`kfqn.core.optimizer`) owns the momentum Mhat of each layer and moves its
parameters; everything curvature-related is the preconditioner's. Per step it calls, for every
layer whose statistics arrived (:class:`kfqn.core.statistics.LayerStatistics`):

1. ``prepare(stats, info)``: absorb this step's statistics; initialise at iteration 0;
2. ``precondition_t(Mhat^T)``: the direction's transpose, (d_a, d_g) -- e.g. (H_g Mhat H_a)^T;
3. after the parameters moved: ``after_move(stats, info)``;
4. with a trial pass (``"trial"`` in :attr:`needs`): ``after_trial(stats, info)`` with
   ``stats.trial`` filled; then ``end_step(stats, info)``.

``info.ok`` is a device bool: false when the loss or a gradient was non-finite; then every state
change must be a no-op (selected with ``torch.where``), counters included. No host
synchronisation inside these calls.

Statistics a preconditioner can ask for (:attr:`needs`): the layer's inputs (always captured),
``"grad_outputs"`` (dL/dh of the user's backward, kept past the backward), ``"sampled_grads"``
(gradients of the model output with cotangents the preconditioner draws,
:meth:`output_cotangents`, backpropagated to every layer before the user's backward) and
``"trial"`` (a second closure call at the trial point on the same minibatch).

Data-parallel training (:mod:`kfqn.core.communicator`): the batch statistics a layer averages
over the ranks are declared per pass by :meth:`batch_means`, so that one collective call per
pass averages them for every layer. ``placement: owner`` (each layer's factors on one rank) needs
every such statistic declared and :attr:`owner_placement` true; the other ranks then hold the
layer's preconditioner on the ``meta`` device and only evaluate its ``batch_means``.

Register a new family with ``@kfqn.register("preconditioner")``; its ``options`` are the keys of
the config section ``preconditioner: {name: ..., <options>}``.
"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch
from torch import Tensor

from kfqn.core.components import Component
from kfqn.core.state_check import tensor_bytes
from kfqn.curvature.base import LayerContext, StepInfo

#: the statistics a preconditioner may declare in :attr:`LayerPreconditioner.needs`
STATISTICS = ("grad_outputs", "sampled_grads", "trial")


class LayerPreconditioner(Component):
    """Base class. ``options``: the keys of its config section; ``config``: the whole resolved
    optimizer config (for families, such as ``kronecker``, configured by other sections)."""

    #: sections of the optimizer config this family reads besides ``preconditioner``
    sections: ClassVar[tuple[str, ...]] = ()
    #: whether :meth:`batch_means` declares every batch statistic it averages over the ranks
    #: (``placement: owner`` needs it; the constructor must also work on the ``meta`` device)
    owner_placement: ClassVar[bool] = False

    def __init__(self, ctx: LayerContext, options: Mapping[str, Any],
                 config: Mapping[str, Any]) -> None:
        self.ctx = ctx
        self.opts = dict(options)
        self.config = config

    # -- what it needs ---------------------------------------------------------------------
    @property
    def needs(self) -> frozenset[str]:
        """The statistics (:data:`STATISTICS`) this layer needs each step."""
        return frozenset()

    @property
    def needs_warm_start(self) -> bool:
        """Whether :meth:`warm_accumulate` should see a forward-only pass before training."""
        return False

    def wants_sampled_grads(self, step: int) -> bool:
        """With ``"sampled_grads"``: whether step ``step`` needs them."""
        return False

    def output_cotangents(self, output: Tensor) -> Tensor:
        """With ``"sampled_grads"``: (R, *output.shape) cotangents of the model output."""
        raise NotImplementedError

    def supports_owner_placement(self) -> bool:
        """Whether ``placement: owner`` can run this layer (see :attr:`owner_placement`)."""
        return bool(self.owner_placement)

    def batch_means(self, phase: str, step: int) -> dict[str, Any]:
        """The batch means of this rank's data that the layer averages over the ranks in
        ``phase`` ('warm': a warm-start batch, 'current', 'trial'), keyed as the preconditioner
        asks for them (adapter method names, or the key given to ``ctx.batch_mean``); each maps
        (the layer adapter, the pass's capture) to the local value. Evaluated on every rank,
        including those that do not own the layer: no state may be read. Phase 'moved' is the
        exception: statistics for :meth:`after_move` that depend on the state and on averages
        of the first round (e.g. an action at s = H v), evaluated on the current capture by
        every rank that holds the layer (never under ``placement: owner``); they travel in the
        extra pass's round, after which :meth:`after_move` then runs, or in a round of their
        own. Keys hold for the whole step. (:func:`kfqn.curvature.base.input_means` builds
        the entries of input statistics.)"""
        return {}

    # -- warm start -------------------------------------------------------------------------
    def warm_accumulate(self, inp: Tensor) -> None:
        """Forward-only warm start: absorb one batch of this layer's inputs."""

    def warm_finish(self, lam_a: float) -> None:
        """End of the warm-start pass."""

    # -- the step ---------------------------------------------------------------------------
    def prepare(self, stats: Any, info: StepInfo) -> None:
        """Before the direction: absorb this step's statistics."""

    def precondition_t(self, mt: Tensor) -> Tensor:
        """The preconditioned direction, transposed: Mhat^T (d_a, d_g) in, (d_a, d_g) out."""
        raise NotImplementedError

    def precondition_t_into(self, mt: Tensor, out: Tensor) -> Tensor:
        """:meth:`precondition_t` written into ``out`` (a (d_a, d_g) view of the optimizer's
        flat direction buffer), returned. Override to write the last product there directly."""
        return out.copy_(self.precondition_t(mt))

    def after_move(self, stats: Any, info: StepInfo) -> None:
        """After the parameters moved (before a trial pass)."""

    def after_trial(self, stats: Any, info: StepInfo) -> None:
        """After the trial pass (``stats.trial`` holds its capture)."""

    def end_step(self, stats: Any, info: StepInfo) -> None:
        """Last call of the step."""

    # -- several layers at one call ------------------------------------------------------------
    # The optimizer calls these, once per step and phase, with every layer of the class; the
    # defaults call the per-layer methods in order. A family overrides them to batch its
    # per-layer scalar work across the layers (fewer dispatched ops); the layers are
    # independent, so the result is that of the loop.
    @classmethod
    def prepare_group(cls, precs: list, stats: list, infos: list) -> None:
        for p, s, i in zip(precs, stats, infos):
            p.prepare(s, i)

    @classmethod
    def after_move_group(cls, precs: list, stats: list, infos: list) -> None:
        for p, s, i in zip(precs, stats, infos):
            p.after_move(s, i)

    @classmethod
    def after_trial_group(cls, precs: list, stats: list, infos: list) -> None:
        for p, s, i in zip(precs, stats, infos):
            p.after_trial(s, i)

    @classmethod
    def end_step_group(cls, precs: list, stats: list, infos: list) -> None:
        for p, s, i in zip(precs, stats, infos):
            p.end_step(s, i)

    # -- reporting and checkpoints ----------------------------------------------------------
    def stats(self) -> dict[str, Tensor]:
        """Scalars of the last step, as device tensors (``opt.stats()`` reads them)."""
        return {}

    def factors(self) -> dict[str, Tensor]:
        """Dense factors for analysis ({'H_a': ..., 'H_g': ..., 'A': ...})."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def state_bytes(self) -> int:
        """Bytes held in optimizer state by this layer's factors."""
        return tensor_bytes(self.state_dict())


class TwoSidedPreconditioner(LayerPreconditioner):
    """A preconditioner made of an input side ``self.a`` (H_a) and an output side ``self.g``
    (H_g), each with ``prepare(cap, info)``, ``apply_t``, ``stats``, ``factors``,
    ``state_dict`` and ``load_state_dict``: P = -H_g Mhat H_a, G side prepared first. The
    subclass builds the two sides (estimators, or its own factor objects)."""

    a: Any
    g: Any

    def supports_owner_placement(self) -> bool:
        return bool(self.owner_placement and self.a.owner_placement and self.g.owner_placement)

    def batch_means(self, phase: str, step: int) -> dict[str, Any]:
        return {**self.a.batch_means(phase, step), **self.g.batch_means(phase, step)}

    def warm_accumulate(self, inp: Tensor) -> None:
        self.a.warm_accumulate(inp)

    def warm_finish(self, lam_a: float) -> None:
        self.a.warm_finish(lam_a)

    def prepare(self, stats: Any, info: StepInfo) -> None:
        self.g.prepare(stats.current, info)
        self.a.prepare(stats.current, info)

    def precondition_t(self, mt: Tensor) -> Tensor:
        return self.a.apply_t(self.g.apply_t(mt))

    def precondition_t_into(self, mt: Tensor, out: Tensor) -> Tensor:
        into = getattr(self.a, "apply_t_into", None)
        if into is None or type(self).precondition_t is not TwoSidedPreconditioner.precondition_t:
            return out.copy_(self.precondition_t(mt))
        return into(self.g.apply_t(mt), out)

    def stats(self) -> dict[str, Tensor]:
        return {**self.a.stats(), **self.g.stats()}

    def factors(self) -> dict[str, Tensor]:
        return {**self.a.factors(), **self.g.factors()}

    def state_dict(self) -> dict[str, Any]:
        return {"a": self.a.state_dict(), "g": self.g.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.a.load_state_dict(state["a"])
        self.g.load_state_dict(state["g"])

