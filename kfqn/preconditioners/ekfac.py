"""EKFAC (George, Laurent, Bouthillier, Ballas, Vincent, *Fast approximate natural gradient
descent in a Kronecker-factored eigenbasis*, NeurIPS 2018): K-FAC's eigenbases with the
diagonal scaling re-estimated in that basis. A thin subclass of :mod:`kfqn.preconditioners.kfac`:
the factors A and G, their statistics, the Fisher (sampled / empirical / exact), cadences and
checkpoints are K-FAC's.

Every T2 steps (K-FAC's inverse cadence) the eigenbases are recomputed,
A = Q_A diag(l_A) Q_A^T and G = Q_G diag(l_G) Q_G^T. Each statistics step the scaling
S (d_g x d_a) is re-estimated in that basis from the per-sample weight gradients
J_{i,r} = sum_t g_{i,t,r} abar_{i,t}^T (r: the Fisher's draws or columns, as in K-FAC's G)::

    S <- beta S + (1 - beta) (1/m) sum_{i,r} (Q_G^T J_{i,r} Q_A)^2     (elementwise square)

restarted from the batch estimate when the basis changes (S belongs to one basis). Direction::

    P = -Q_G [ (Q_G^T Mhat Q_A) / (S + lambda) ] Q_A^T

``scaling: kronecker`` uses S = (l_G + gamma_G)(l_A + gamma_A)^T instead (no per-sample
gradients): then P is exactly K-FAC's (G + gamma_G I)^{-1} Mhat (A + gamma_A I)^{-1}, the oracle
the tests check. The per-sample gradients take the (m, |T|, d_a) patches of the layer's input:
for large Conv2d layers that is memory heavy.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from kfqn.core.components import Option, register
from kfqn.curvature.base import LayerContext, StepInfo
from kfqn.preconditioners.kfac import OPTIONS, KFACPreconditioner


@register("preconditioner")
class EKFACPreconditioner(KFACPreconditioner):
    name = "ekfac"
    description = ("EKFAC [George et al. 2018]: K-FAC's eigenbases, diagonal scaling "
                   "re-estimated in them from per-sample gradients")
    #: the scaling's statistic is formed in the eigenbasis, which only the owner would hold
    owner_placement = False
    options = {
        **OPTIONS,
        "scaling": Option("refit", "'refit': S = EMA of the squared per-sample gradients in the "
                          "eigenbasis (EKFAC); 'kronecker': S = eigenvalue products (= K-FAC)",
                          choices=["refit", "kronecker"]),
    }

    def __init__(self, ctx: LayerContext, options: Mapping[str, Any],
                 config: Mapping[str, Any]) -> None:
        super().__init__(ctx, options, config)
        dt, dev = ctx.dtype, ctx.device
        self.basis: dict[str, Tensor] | None = None  # q_a, l_a, q_g, l_g
        self.scale = torch.zeros(ctx.adapter.d_g, ctx.adapter.d_a, dtype=dt, device=dev)
        self.scale_seen = torch.zeros((), dtype=torch.bool, device=dev)
        self.lam = 0.0
        self.gammas: tuple[Any, Any] = (0.0, 0.0)
        self._basis_pending = False

    # -- statistics ---------------------------------------------------------------------------
    def _per_sample_grads(self, cap: Any) -> list[Tensor]:
        """The per-sample output gradients g (m, |T|, d_g), one tensor per draw / column."""
        adapter, m = self.ctx.adapter, cap.batch
        if self.opts["fisher"] == "empirical":
            return [adapter.per_sample_grad_outputs(cap.grad_out)]
        return [adapter.per_sample_grad_outputs(x) / m for x in cap.sampled_grad_out]

    def _batch_scale(self, cap: Any) -> Tensor:
        """(1/m) sum_{i,r} (Q_G^T J_{i,r} Q_A)^2."""
        dt = self.ctx.dtype
        a = self.ctx.adapter.patches(cap.inp).to(dt) @ self.basis["q_a"]        # (m, T, d_a)
        total = torch.zeros_like(self.scale)
        for g in self._per_sample_grads(cap):
            g = g.to(dt) @ self.basis["q_g"]                                     # (m, T, d_g)
            j = torch.einsum("mtg,mta->mga", g, a)
            total = total + (j * j).sum(0)
        total = total / cap.batch
        return self.ctx.batch_mean("S", lambda: total)

    def _refresh_basis(self, step: int) -> bool:
        """Eigenbases of A and G (and the dampings of that moment) at K-FAC's inverse cadence:
        every T2 steps, every step k < inverse_warmup, and while there is none. True if they
        changed."""
        due = (self.basis is None or step < self.opts["inverse_warmup"]
               or step % self.opts["inverse_every"] == 0 or self._basis_pending)
        if not due or not self.opts["precondition"] or self.a.mat is None or self.g.mat is None:
            return False
        # the refitted scaling belongs to one basis and is re-estimated from this step's
        # per-sample gradients: on a step without statistics the change waits for the next one
        if self.opts["scaling"] == "refit" and not self.g.stats_due(step):
            self._basis_pending = True
            return False
        self._basis_pending = False
        l_a, q_a = torch.linalg.eigh(self.a.mat)
        l_g, q_g = torch.linalg.eigh(self.g.mat)
        self.basis = {"q_a": q_a, "l_a": l_a.clamp_min(0), "q_g": q_g, "l_g": l_g.clamp_min(0)}
        self.gammas = (self.a._damping(), self.g._damping())
        return True

    def prepare(self, stats: Any, info: StepInfo) -> None:
        super().prepare(stats, info)   # A and G statistics, the per-side dampings
        self.a._inverse_due = self.g._inverse_due = False  # K-FAC's inverses are not used here
        self.lam = info.lam_a * info.mu2
        changed = self._refresh_basis(info.step)
        if self.opts["scaling"] != "refit" or self.basis is None:
            return
        if self.g.stats_due(info.step):
            batch = self._batch_scale(stats.current)
            good = info.ok & torch.isfinite(batch).all()
            keep = torch.zeros_like(self.scale_seen) if changed else self.scale_seen
            beta = self.opts["beta"]
            new = torch.where(keep, beta * self.scale + (1.0 - beta) * batch, batch)
            self.scale.copy_(torch.where(good, new, self.scale))
            self.scale_seen |= good

    # -- the direction ------------------------------------------------------------------------
    def _denominator(self) -> Tensor:
        b = self.basis
        if self.opts["scaling"] == "kronecker":
            ga, gg = self.gammas
            return (b["l_g"] + gg)[:, None] * (b["l_a"] + ga)[None, :]
        return self.scale + self.lam

    def precondition_t(self, mt: Tensor) -> Tensor:
        if not self.opts["precondition"] or self.basis is None:
            return mt
        b = self.basis
        rotated = b["q_a"].T @ mt @ b["q_g"]                 # (Q_G^T M Q_A)^T, (d_a, d_g)
        return b["q_a"] @ (rotated / self._denominator().T) @ b["q_g"].T

    # -- reporting and checkpoints --------------------------------------------------------------
    def factors(self) -> dict[str, Tensor]:
        out = {k: v.clone() for k, v in (("A", self.a.mat), ("G", self.g.mat)) if v is not None}
        if self.basis is not None:
            out.update({"Q_A": self.basis["q_a"].clone(), "Q_G": self.basis["q_g"].clone(),
                        "S": self._denominator().clone()})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "basis": self.basis, "scale": self.scale,
                "scale_seen": self.scale_seen, "lam": self.lam, "gammas": list(self.gammas),
                "basis_pending": self._basis_pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        dev, dt = self.ctx.device, self.ctx.dtype
        basis = state["basis"]
        self.basis = None if basis is None else {k: v.to(dev, dt).clone()
                                                 for k, v in basis.items()}
        self.scale = state["scale"].to(dev, dt).clone()
        self.scale_seen = state["scale_seen"].to(dev).clone()
        self.lam = float(state["lam"])
        self.gammas = tuple(g.to(dev).clone() if isinstance(g, Tensor) else float(g)
                            for g in state["gammas"])
        self._basis_pending = bool(state.get("basis_pending", False))
