"""Output-space curvature of the losses K-FAC's G side supports (docs/algorithms.md §4, ``kfac``).

For a per-sample loss l_i(z_i, y_i) with z_i the model output of sample i, the Fisher of the
model's predictive distribution p(y | z) and, for these canonical-link losses, the generalised
Gauss-Newton matrix coincide in output space:

    F_z = E_{yhat ~ p(.|z)} [grad_z l(z, yhat) grad_z l(z, yhat)^T] = Hess_z l(z, y)

(Martens, *New insights and perspectives on the natural gradient method*, JMLR 2020, §9.2).
Two ways to reach a layer's G = E[g g^T] from here (g = J_h^T v, J_h = dz/dh):

* ``sampled_cotangent``: v = grad_z l(z, yhat) with yhat drawn from the model (the true-Fisher
  Monte Carlo estimate of Martens & Grosse, *K-FAC*, ICML 2015, §5);
* ``hessian_sqrt``: the R columns q_r with sum_r q_r q_r^T = Hess_z l_i, so that
  sum_r (J^T q_r)(J^T q_r)^T is the exact GGN (R backward passes, R = outputs per sample).

Losses: ``cross_entropy`` (softmax over dim 1; Hess = diag(p) - p p^T, yhat ~ Categorical(p)),
``sigmoid_cross_entropy`` (Hess = diag(s (1 - s)), yhat ~ Bernoulli(s)), ``mse`` with
l = c (z - y)^2 per element (Hess = 2c I, yhat ~ N(z, 1/(2c)); c = 0.5 is the half squared
error). Reduction ``batch``: summed over output elements (cross-entropy: over positions) and
averaged over samples, as in P2's autoencoders; ``mean``: averaged over every element (torch's
default), which divides l_i by the number K of elements it averages.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kfqn.curvature.counter_rng import CounterRNG
from torch import Tensor

from kfqn.core.errors import KfqnError

LOSSES = ("cross_entropy", "sigmoid_cross_entropy", "mse")
REDUCTIONS = ("batch", "mean")


def finite(z: Tensor) -> Tensor:
    """``z`` with non-finite entries set to 0: a diverged step must not make the sampler fail
    (its statistics are discarded anyway, the step being non-finite)."""
    return torch.where(torch.isfinite(z), z, torch.zeros_like(z))


@dataclass(frozen=True)
class OutputLoss:
    """One supported loss: ``kind`` in :data:`LOSSES`, ``reduction`` in :data:`REDUCTIONS`,
    ``mse_scale`` the c of l = c (z - y)^2 (``mse`` only)."""

    kind: str
    reduction: str = "batch"
    mse_scale: float = 0.5

    # -- shapes ----------------------------------------------------------------------------
    def check(self, z: Tensor) -> None:
        """Raise a clear error when ``z`` cannot be the output this loss is computed on."""
        if z.dim() < 1 or z.shape[0] == 0:
            raise KfqnError(f"loss {self.kind!r}: the model output must have a batch dimension, "
                            f"got shape {tuple(z.shape)}")
        if self.kind == "cross_entropy" and (z.dim() < 2 or z.shape[1] < 2):
            raise KfqnError(
                f"loss = 'cross_entropy' needs logits of shape (batch, classes, ...) with "
                f"at least 2 classes; the model returned shape {tuple(z.shape)}. For one logit per "
                "output use loss=sigmoid_cross_entropy; for regression loss=mse")

    def _per_sample_elements(self, z: Tensor) -> int:
        """K: how many terms l_i averages under reduction 'mean' (1 under 'batch')."""
        if self.reduction == "batch":
            return 1
        dims = z.shape[2:] if self.kind == "cross_entropy" else z.shape[1:]
        return max(1, math.prod(dims))

    # -- true Fisher: sampled labels -------------------------------------------------------------
    def sampled_cotangent(self, z: Tensor, generator: "torch.Generator | CounterRNG",
                          samples: int = 1) -> Tensor:
        """(samples, *z.shape): grad_z of sum_i l_i(z_i, yhat_i) for ``samples`` independent
        draws yhat ~ p(. | z), each scaled by 1/sqrt(samples) so that sum_r v_r v_r^T is the
        Monte Carlo mean. ``generator``: a ``torch.Generator`` or a
        :class:`~kfqn.curvature.counter_rng.CounterRNG` (the optimizer's: it does not move on
        skipped steps)."""
        counter = isinstance(generator, CounterRNG)
        self.check(z)
        z = finite(z)
        scale = 1.0 / (self._per_sample_elements(z) * math.sqrt(samples))
        zz = z.unsqueeze(0).expand(samples, *z.shape).reshape(samples * z.shape[0], *z.shape[1:])
        if self.kind == "cross_entropy":
            p = torch.softmax(zz, dim=1)
            last = p.movedim(1, -1)
            rows = last.reshape(-1, p.shape[1])
            idx = (generator.categorical(rows) if counter
                   else torch.multinomial(rows, 1, generator=generator))
            onehot = F.one_hot(idx.reshape(-1), p.shape[1]).to(p.dtype).reshape(last.shape)
            v = p - onehot.movedim(-1, 1)
        elif self.kind == "sigmoid_cross_entropy":
            s = torch.sigmoid(zz)
            v = s - (generator.bernoulli(s) if counter else torch.bernoulli(s, generator=generator))
        else:  # mse: 2c (z - yhat), yhat = z + eps / sqrt(2c)
            eps = (generator.normal(zz.shape, zz.dtype) if counter else
                   torch.randn(zz.shape, generator=generator, dtype=zz.dtype, device=zz.device))
            v = -math.sqrt(2.0 * self.mse_scale) * eps
        return (v * scale).reshape(samples, *z.shape)

    # -- exact Fisher / GGN: square root of the output Hessian -----------------------------------
    def hessian_sqrt(self, z: Tensor) -> Tensor:
        """(R, *z.shape): columns q_r, sum_r q_r q_r^T = Hess_z l_i for every sample i at once
        (each column holds one such vector per sample). R = classes x positions for
        cross-entropy, elements per sample otherwise."""
        self.check(z)
        z = finite(z)
        k_scale = 1.0 / math.sqrt(self._per_sample_elements(z))
        m = z.shape[0]
        if self.kind == "cross_entropy":
            c = z.shape[1]
            zr = z.reshape(m, c, -1)
            t = zr.shape[2]
            p = torch.softmax(zr, dim=1)                                   # (m, C, T)
            eye_c = torch.eye(c, dtype=z.dtype, device=z.device)
            # q[i, a, k, t] = sqrt(p_a) (delta_ak - p_k) at position t: (m, C_col, C, T)
            q = p.sqrt()[:, :, None, :] * (eye_c[None, :, :, None] - p[:, None, :, :])
            eye_t = torch.eye(t, dtype=z.dtype, device=z.device)
            cols = q.permute(1, 0, 2, 3)[:, None] * eye_t[None, :, None, None, :]  # (C, T, m, C, T)
            return (cols * k_scale).reshape(c * t, *z.shape)
        if self.kind == "sigmoid_cross_entropy":
            s = torch.sigmoid(z).reshape(m, -1)
            d = (s * (1.0 - s)).sqrt()
        else:
            d = torch.full((m, z[0].numel()), math.sqrt(2.0 * self.mse_scale), dtype=z.dtype,
                           device=z.device)
        k = d.shape[1]
        eye = torch.eye(k, dtype=z.dtype, device=z.device)
        cols = d.T[:, :, None] * eye[:, None, :]                           # (K, m, K)
        return (cols * k_scale).reshape(k, *z.shape)

    # -- the loss itself ---------------------------------------------------------------------------
    def __call__(self, z: Tensor, y: Tensor) -> Tensor:
        """The training loss (:meth:`value`): ``opt.closure`` and the runner compute the loss
        the optimizer's Fisher belongs to with the same object."""
        return self.value(z, y)

    @classmethod
    def of(cls, spec: "OutputLoss | str | dict") -> "OutputLoss":
        """An :class:`OutputLoss` from itself, a kind name or a mapping of its fields."""
        if isinstance(spec, OutputLoss):
            return spec
        if isinstance(spec, str):
            spec = {"kind": spec}
        if not isinstance(spec, dict):
            raise KfqnError(f"loss must be an OutputLoss, a loss name ({', '.join(LOSSES)}) or a "
                            f"mapping with 'kind'; got {spec!r}")
        unknown = sorted(set(spec) - {"kind", "reduction", "mse_scale"})
        if unknown or spec.get("kind") not in LOSSES or \
                spec.get("reduction", "batch") not in REDUCTIONS:
            raise KfqnError(f"loss = {spec!r}: kind must be one of {', '.join(LOSSES)}, reduction "
                            f"one of {', '.join(REDUCTIONS)} (keys: kind, reduction, mse_scale)")
        return cls(**spec)

    def options(self) -> dict:
        """The config options of a Fisher that belongs to this loss (``loss``,
        ``loss_reduction``, ``mse_scale``)."""
        return {"loss": self.kind, "loss_reduction": self.reduction, "mse_scale": self.mse_scale}

    def value(self, z: Tensor, y: Tensor) -> Tensor:
        """The batch loss this configuration describes, for targets ``y``."""
        k = self._per_sample_elements(z)
        m = z.shape[0]
        if self.kind == "cross_entropy":
            per = F.cross_entropy(z, y, reduction="sum")
        elif self.kind == "sigmoid_cross_entropy":
            per = F.binary_cross_entropy_with_logits(z, y, reduction="sum")
        else:
            per = self.mse_scale * ((z - y) ** 2).sum()
        return per / (m * k)
