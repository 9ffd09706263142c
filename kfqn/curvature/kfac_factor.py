"""What K-FAC's two sides share: an EMA factor, its cadences and its damped inverse (docs/algorithms.md §4).

Per side (A: d_a x d_a, G: d_g x d_g), with k the optimizer step:

* statistics every T1 steps (``stats_every``; and whenever none exist yet):
  F <- beta F + (1 - beta) F_batch, the first batch initialising F;
* the inverse every T2 steps (``inverse_every``) and at every step k < ``inverse_warmup``
  (P2 reference code: EMA 0.9, inverse every 20 steps and every step for the first 20):
  H = (F + gamma I)^{-1} by the configured inversion strategy, computed right before its first
  use in the step (after both sides' statistics, which the pi-split needs);
* Tikhonov damping gamma: the layer's per-side damping (sqrt(lambda); conv layers split by
  ``conv_damping_split``); with ``damping_split: pi`` the A side takes pi times it and the G side
  1/pi times it, pi = sqrt((tr A / d_a) / (tr G / d_g)) (Martens & Grosse, ICML 2015, §6.3),
  so that the product stays lambda.

Everything conditional runs on the device (``torch.where``); step counters are python ints.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from kfqn.core.components import Option
from kfqn.core.sections import Sub
from kfqn.curvature.base import LayerContext

CADENCE_OPTIONS: dict[str, Option | Sub] = {
    "beta": Option(0.9, "EMA decay of the factor (P2 code: 0.9)", type=float, low=0.0, high=1.0,
                   open_high=True),
    "stats_every": Option(1, "T1: update the factor's statistics every T1 steps", type=int, low=1),
    "inverse_every": Option(20, "T2: recompute the damped inverse every T2 steps", type=int, low=1),
    "inverse_warmup": Option(20, "also recompute it at every step k < this (P2 code: 20)",
                             type=int, low=0),
    "damping_split": Option("sqrt", "'sqrt': the layer's per-side damping (sqrt(lambda)); 'pi': "
                            "times pi on A, divided by pi on G, pi = sqrt((tr A/d_a)/(tr G/d_g)); "
                            "", choices=["sqrt", "pi"]),
    "precondition": Option(True, "false: H = I while statistics are still kept (preconditioning "
                           "switched off, for tests and ablations)", type=bool),
    "inversion": Sub("inversion", "cholesky", "how (F + gamma I)^{-1} is computed"),
}

class KFACFactorMixin:
    """Shared state and logic of the K-FAC A and G estimators (see the module docstring).

    Subclasses set ``side`` ('a' or 'g'), ``factor_key`` and ``inverse_key``, and call
    :meth:`_init_factor`, :meth:`_absorb` (with a batch statistic) and :meth:`_preconditioned`.
    """

    side: str = "a"
    #: pi of the pi-split, set by the owning preconditioner (both factors' traces)
    pi: Any = staticmethod(lambda: 1.0)
    factor_key: str = "A"
    inverse_key: str = "H_a"
    ctx: LayerContext
    opts: dict
    _stats: dict

    def _init_factor(self, dim: int) -> None:
        ctx = self.ctx
        self.dim = dim
        self.inversion = ctx.inversion(self.opts["inversion"])
        self.mat: Tensor | None = None
        self.inverse: Tensor | None = None
        self.seen = torch.zeros((), dtype=torch.bool, device=ctx.device)
        #: accepted statistics updates (device; a skipped step leaves it alone)
        self.stat_updates = torch.zeros((), dtype=torch.long, device=ctx.device)
        self.inversions = 0
        self._inverse_due = False
        self._gamma: float | Tensor = 0.0
        self._eye = torch.eye(dim, dtype=ctx.dtype, device=ctx.device)

    # -- cadences ----------------------------------------------------------------------------
    def stats_due(self, step: int) -> bool:
        """Whether step ``step`` updates the statistics (T1; always while there are none)."""
        return self.mat is None or step % self.opts["stats_every"] == 0

    def inverse_due(self, step: int) -> bool:
        """Whether step ``step`` recomputes the inverse (T2, warm-up; always while none exists)."""
        return (self.inverse is None or step < self.opts["inverse_warmup"]
                or step % self.opts["inverse_every"] == 0)

    # -- statistics --------------------------------------------------------------------------
    def _absorb(self, batch: Tensor, ok: Tensor, skip_ema: Tensor | None = None) -> None:
        """F <- beta F + (1 - beta) F_batch (F_batch itself the first time); a no-op where ``ok``
        is false or F_batch is not finite. ``skip_ema`` (device bool): keep F (iteration 0
        after a warm start)."""
        batch = batch.to(self.ctx.dtype)
        good = ok & torch.isfinite(batch).all()
        if self.mat is None:
            self.mat = torch.zeros_like(batch)
        take = good if skip_ema is None else good & ~skip_ema
        beta = self.opts["beta"]
        new = torch.where(self.seen, beta * self.mat + (1.0 - beta) * batch, batch)
        self.mat.copy_(torch.where(take, new, self.mat))      # in place: static addresses
        self.seen |= take
        self.stat_updates += good.long()

    def _set_factor(self, mat: Tensor) -> None:
        """Set F directly (warm start)."""
        self.mat = mat.to(self.ctx.dtype)
        self.seen = torch.ones((), dtype=torch.bool, device=self.ctx.device)

    # -- inverse -----------------------------------------------------------------------------
    def _schedule_inverse(self, step: int, gamma: float) -> None:
        """Called in ``prepare``: mark the inverse for recomputation if the cadence says so."""
        self._gamma = gamma
        if self.opts["precondition"] and self.inverse_due(step):
            self._inverse_due = True

    def _damping(self) -> float | Tensor:
        if self.opts["damping_split"] != "pi":
            return self._gamma
        pi = self.pi()
        return self._gamma * pi if self.side == "a" else self._gamma / pi

    def _refresh_inverse(self) -> None:
        if not self._inverse_due or self.mat is None:
            return
        self._inverse_due = False
        gamma = self._damping()
        res = self.inversion.invert(self.mat, gamma)
        if self.inverse is None or self.inverse.shape != res.inverse.shape:
            self.inverse = res.inverse
        else:
            self.inverse.copy_(res.inverse)   # in place: static addresses
        self.inversions += 1
        st = self._stats
        st[f"{self.side}_inversion_fallback"] = res.fallback
        st[f"{self.side}_damping"] = (  # a python float goes by a fill, not a host-to-device copy
            gamma.to(self.ctx.dtype) if isinstance(gamma, Tensor)
            else torch.full((), gamma, dtype=self.ctx.dtype, device=self.ctx.device))

    def _inverse_or_identity(self) -> Tensor:
        self._refresh_inverse()
        return self._eye if self.inverse is None else self.inverse

    # -- reporting and checkpoints -------------------------------------------------------------
    def factors(self) -> dict[str, Tensor]:
        out = {self.inverse_key: self._inverse_or_identity().clone()}
        if self.mat is not None:
            out[self.factor_key] = self.mat.clone()
        return out

    def _factor_state(self) -> dict[str, Any]:
        return {"mat": self.mat, "inverse": self.inverse, "seen": self.seen,
                "stat_updates": self.stat_updates, "inversions": self.inversions,
                "inverse_due": self._inverse_due, "gamma": self._gamma}

    def _load_factor_state(self, state: Mapping[str, Any]) -> None:
        dev, dt = self.ctx.device, self.ctx.dtype
        move = lambda t: None if t is None else t.to(dev, dt).clone()  # noqa: E731
        self.mat = move(state["mat"])
        self.inverse = move(state["inverse"])
        self.seen = state["seen"].to(dev).clone()
        self.stat_updates = torch.as_tensor(state["stat_updates"]).to(dev, torch.long).clone()
        self.inversions = int(state["inversions"])
        self._inverse_due = bool(state["inverse_due"])
        gamma = state["gamma"]
        self._gamma = gamma.to(dev).clone() if isinstance(gamma, Tensor) else float(gamma)
