"""Contracts for inverse-factor update rules and damping rules.

An :class:`InverseFactor` holds an approximation H of the inverse of a curvature factor (H_a or
H_g) and updates it from secant pairs (s, y) so that, for rules with ``satisfies_secant``,
H+ y = s. Updates are branch-free on the device: a rejected pair leaves H unchanged through
``torch.where``; nothing calls ``.item()``.

Factors never become non-finite: the built-in rules reject any pair whose update could overflow
or lose definiteness (see each rule), and a non-finite starting point (``reset(h0)`` or a loaded
state) is replaced by the rule's initial value and counted in :attr:`InverseFactor.resets` (a
0-dim long device tensor, part of ``state_dict()``; :meth:`InverseFactor.stats` reports it).

A :class:`Damping` maps (s, y) to a damped pair using H y (docs/algorithms.md §3); a pair the rule cannot damp
to its postcondition in floating point comes back zeroed with ``ok`` false (then every update
rule rejects it, since s^T y = 0).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, ClassVar

import torch
from torch import Tensor

from kfqn.core.components import Component


class InverseFactor(Component):
    """An inverse factor H of dimension ``dim``, updated from secant pairs."""

    #: whether an accepted update makes H+ y = s hold exactly
    satisfies_secant: ClassVar[bool] = True
    #: whether an accepted update from a pair with s^T y > 0 keeps H positive definite
    keeps_positive_definite: ClassVar[bool] = True
    #: whether ``reset(H0)`` can take a dense initial matrix
    accepts_dense_init: ClassVar[bool] = True

    #: reject a pair unless s^T y > cancel_tol * eps * y^T H y (eps of the factor dtype): the new
    #: H has y^T H+ y = s^T y, computed from terms of size y^T H y, so a smaller s^T y is lost
    #: to cancellation (e.g. H = [[1e30]], s = y = 0.6 in float32 gives H+ = 0)
    cancel_tol: ClassVar[float] = 64.0

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device | str, **options: Any):
        self.dim = dim
        self.dtype = dtype
        self.device = torch.device(device)
        #: times the factor was found non-finite and reset to its initial value (device tensor)
        self.resets = torch.zeros((), dtype=torch.long, device=self.device)

    def stats(self) -> dict[str, Tensor]:
        """Device figures of this factor: ``{"resets": 0-dim long tensor}``."""
        resets = getattr(self, "resets", None)
        if resets is None:  # a plugin that does not call InverseFactor.__init__
            resets = torch.zeros((), dtype=torch.long, device=getattr(self, "device", "cpu"))
        return {"resets": resets}

    def _load_resets(self, state: dict[str, Any]) -> None:
        """Take ``resets`` from a state dict (0 for state dicts written before it existed)."""
        r = state.get("resets")
        self.resets = (torch.zeros((), dtype=torch.long, device=self.device) if r is None
                       else torch.as_tensor(r).to(device=self.device, dtype=torch.long).reshape(()).clone())

    def reset(self, h0: Tensor | None = None) -> None:
        """Start again from ``h0`` (dense, symmetric positive definite) or the identity."""
        raise NotImplementedError

    def apply(self, v: Tensor) -> Tensor:
        """H v for a vector (dim,) or each column of a matrix (dim, n)."""
        raise NotImplementedError

    def apply_into(self, v: Tensor, out: Tensor) -> Tensor:
        """``apply(v)`` written into ``out`` (same shape), returned; override to write the
        product there directly."""
        return out.copy_(self.apply(v))

    def update(self, s: Tensor, y: Tensor, allow: Tensor | None = None) -> Tensor:
        """Update from the pair (s, y) where ``allow`` (a bool tensor) holds and the pair is
        admissible; return the bool tensor 'accepted'."""
        raise NotImplementedError

    @classmethod
    def update_many(cls, factors: Sequence["InverseFactor"], s: Sequence[Tensor],
                    y: Sequence[Tensor], allow: Sequence[Tensor | None]) -> list[Tensor]:
        """``[f.update(s_i, y_i, allow_i) for each layer]`` -- the factors of several layers
        (same class and options, any sizes) updated at one call, bitwise as that loop does;
        a rule may batch its per-layer scalar logic across the layers (fewer dispatched ops)."""
        return [f.update(si, yi, ai) for f, si, yi, ai in zip(factors, s, y, allow)]

    @staticmethod
    def _update_grouped(factors: list["InverseFactor"], s: list[Tensor], y: list[Tensor],
                        allow: list[Tensor | None], key_of: Callable[[int], Any],
                        run_group: Callable[[list[int]], list[Tensor]]) -> list[Tensor]:
        """The dispatch of a batched :meth:`update_many`: layer i goes into the group
        ``key_of(i)`` (None: not batchable); groups of two or more layers run through
        ``run_group(positions)`` (their flags in that order), the others through ``update``.
        A factor listed twice makes it the plain loop (the loop updates it twice in turn)."""
        if len({id(f) for f in factors}) < len(factors):
            return [f.update(si, yi, ai) for f, si, yi, ai in zip(factors, s, y, allow)]
        groups: dict[Any, list[int]] = {}
        for i in range(len(factors)):
            groups.setdefault(key_of(i), []).append(i)
        out: list[Tensor | None] = [None] * len(factors)
        for key, idx in groups.items():
            if key is None or len(idx) < 2:
                for i in idx:
                    out[i] = factors[i].update(s[i], y[i], allow[i])
            else:
                for i, ok in zip(idx, run_group(idx)):
                    out[i] = ok
        return out  # type: ignore[return-value]

    def apply_right(self, m: Tensor) -> Tensor:
        """m H^T for a matrix (n, dim), i.e. ``apply(m.T).T`` (override for a faster layout)."""
        return self.apply(m.T).T

    def dense(self) -> Tensor:
        """H as a dense (dim, dim) matrix (for analysis and tests)."""
        return self.apply(torch.eye(self.dim, dtype=self.dtype, device=self.device))

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def state_bytes(self) -> int:
        """Bytes of tensors held as state."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values()
                   if isinstance(t, Tensor))


def admissible(s: Tensor, y: Tensor, allow: Tensor | None) -> Tensor:
    """0 < s^T y < inf, s and y finite, and ``allow``: the acceptance test shared by update
    rules."""
    return _admissible(torch.dot(s, y), allow)


def _admissible(sy: Tensor, allow: Tensor | None) -> Tensor:
    """:func:`admissible` from sy = s^T y: a finite s^T y implies finite s and y (a non-finite
    entry of either makes a term of the dot product, and so the sum, non-finite)."""
    ok = (sy > 0) & (sy < float("inf"))
    if allow is not None:
        ok = ok & allow
    return ok


@dataclass
class DampingResult:
    """A damped pair plus bool tensors saying which damping steps were active."""

    s: Tensor
    y: Tensor
    active: dict[str, Tensor] = field(default_factory=dict)
    #: bool tensor: the pair met the rule's postcondition (within :func:`postcondition_rtol`);
    #: where false, ``s`` and ``y`` are zero, so any update rule rejects the pair. ``None``:
    #: the rule has no postcondition (always usable as it is).
    ok: Tensor | None = None


def postcondition_rtol(dtype: torch.dtype) -> float:
    """Relative tolerance of the damping postconditions in ``dtype``: 1e-4 in float32 and
    1e-10 in float64 (about 1000 and 450 000 eps: the room the dot products need when
    the entries of s and y cancel)."""
    return 1e-10 if dtype == torch.float64 else 1e-4


class Damping(Component):
    """A damping rule. ``mu2`` is the layer's second damping constant (from lambda)."""

    def __init__(self, **options: Any) -> None:
        self.opts = options

    def __call__(self, s: Tensor, y: Tensor, hy: Callable[[Tensor], Tensor], mu2: float) -> DampingResult:
        raise NotImplementedError

    def many(self, s: Sequence[Tensor], y: Sequence[Tensor],
             hy: Sequence[Callable[[Tensor], Tensor]], mu2: Sequence[float]) -> list[DampingResult]:
        """``[self(s_i, y_i, hy_i, mu2_i) for each layer]`` at one call, bitwise as that loop
        does; a rule may batch its per-layer scalar logic across the layers."""
        return [self(si, yi, hi, mi) for si, yi, hi, mi in zip(s, y, hy, mu2)]

    def guarantee(self, s: Tensor, y: Tensor, hy: Callable[[Tensor], Tensor], mu2: float) -> Tensor:
        """The rule's postcondition on its own output pair (bool tensor), for contract tests."""
        return torch.dot(s, y) > 0
